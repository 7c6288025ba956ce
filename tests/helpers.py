"""Small helpers shared by tests."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.auth import create_api_key


def new_key(session: Session, name: str = "test") -> tuple[int, dict[str, str]]:
    """Create an API key; return its id and the Authorization header that carries it."""
    key, plaintext = create_api_key(session, name)
    session.commit()
    return key.id, {"Authorization": f"Bearer {plaintext}"}
