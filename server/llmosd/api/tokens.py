"""Bearer tokens: each names a namespace and a role (api/authority.py). The kernel's store keeps
only a token's SHA-256; the secret is shown once, when it is made."""
from __future__ import annotations

import hashlib
import os
import secrets
import threading
from typing import Any

from . import checks as C
from .authority import ADMIN, DEFAULT_NAMESPACE, TOKEN_ROLES, Caller
from .errors import InvalidArgument

TOKEN_PREFIX = "llmos_"
ADMIN_TOKEN_FILE = "admin.token"  # in the data dir, mode 0600, written on first start


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Tokens:
    """The tokens of the store, by digest, in memory (each call looks its token up here)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._by_digest = {row[1]: Caller(row[2], row[3], key=row[0]) for row in store.tokens()}

    def caller_of(self, token: str) -> Caller | None:
        return self._by_digest.get(digest(token))

    def create(self, namespace: str, role: str, label: str = "") -> tuple[str, str]:
        """(id, token) of a new token."""
        C.name(namespace, "namespace")
        if role not in TOKEN_ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(TOKEN_ROLES)}, not {role!r}")
        C.text(label, "label")
        token_id, token = secrets.token_hex(8), TOKEN_PREFIX + secrets.token_urlsafe(32)
        self.store.add_token(token_id, digest(token), namespace, role, label)
        with self._lock:
            self._by_digest = {**self._by_digest, digest(token): Caller(namespace, role, key=token_id)}
        return token_id, token

    def list(self) -> list[tuple[str, str, str, str, int]]:
        """(id, namespace, role, label, created_at_ms) of every token."""
        return [(row[0], row[2], row[3], row[4], row[5]) for row in self.store.tokens()]

    def revoke(self, token_id: str) -> bool:
        revoked = self.store.delete_token(token_id)
        with self._lock:
            self._by_digest = {d: c for d, c in self._by_digest.items() if c.key != token_id}
        return revoked

    def first_admin_token(self, data_dir: str) -> str | None:
        """On a first start (no admin token yet), make one and write it to a 0600 file in
        `data_dir`: the file's path, else None."""
        if any(c.role == ADMIN for c in self._by_digest.values()):
            return None
        _, token = self.create(DEFAULT_NAMESPACE, ADMIN, "made by llmosd on first start")
        path = os.path.join(os.path.abspath(data_dir), ADMIN_TOKEN_FILE)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that existed
        return path
