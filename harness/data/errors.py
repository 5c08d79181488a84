"""One error type for bad input data, always naming where the problem is."""

from __future__ import annotations


class DataError(ValueError):
    """Bad or missing input data.

    The message always names the file (``path``), the key inside it (``key``) and what is wrong, so a user
    can find the offending record without a debugger.
    """

    def __init__(self, problem: str, path: object = None, key: object = None):
        self.path = None if path is None else str(path)
        self.key = None if key is None else str(key)
        self.problem = problem
        where = []
        if self.path is not None:
            where.append(f"path={self.path}")
        if self.key is not None:
            where.append(f"key={self.key}")
        super().__init__(f"{problem}" + (f" [{', '.join(where)}]" if where else ""))
