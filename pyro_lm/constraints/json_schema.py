r"""A JSON schema on the whole text of a completion."""

from __future__ import annotations

import json

from pyro_lm.constraints.base import Constraint

__all__ = ["JSONSchema"]


class JSONSchema(Constraint):
    r"""The completion's text is a JSON document valid under ``schema``:
    :math:`c(x) = 0` if :math:`\text{text}(x)` parses and validates, else :math:`-\infty`
    (see :mod:`pyro_lm.constraints.base`).

    llguidance compiles the schema to a grammar [1]; its options (``whitespace_flexible``,
    separators, ...) are passed as ``options`` or in the schema's ``"x-guidance"`` key.
    By default no whitespace is allowed between tokens of the JSON (``{"a":1}``), so
    that a small LM cannot pad its output with spaces; pass
    ``options={"whitespace_flexible": True}`` to allow it.

    >>> schema = {"type": "object", "properties": {"stars": {"type": "integer"}},
    ...           "required": ["stars"], "additionalProperties": False}
    >>> c = pyro_lm.constraints.JSONSchema(lm, schema)  # doctest: +SKIP

    :param lm: the :class:`~pyro_lm.CausalLM` whose tokenizer the completions use.
    :param schema: the schema, a dict or its JSON text.
    :param dict options: llguidance's JSON compile options (they override the schema's
        ``"x-guidance"``).
    :param str name: used in errors (default ``"JSONSchema"``).
    :raises ValueError: naming ``schema`` if it is not JSON or llguidance refuses it.

    References:

    [1] llguidance JSON schema support,
    https://github.com/guidance-ai/llguidance/blob/main/docs/json_schema.md
    """

    def __init__(self, lm, schema, options: dict | None = None, name: str | None = None):
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"schema: not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise TypeError(f"schema: expected a dict (or its JSON text), got "
                            f"{type(schema).__name__}")
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options: expected a dict of llguidance JSON options, got "
                            f"{type(options).__name__}")
        if not isinstance(schema.get("x-guidance", {}), dict):
            raise TypeError(f"schema['x-guidance']: expected a dict of llguidance JSON options, "
                            f"got {type(schema['x-guidance']).__name__}")
        self.schema = schema
        guidance = {"whitespace_flexible": False, **schema.get("x-guidance", {}),
                    **(options or {})}
        lark = "start: %json " + json.dumps(dict(schema, **{"x-guidance": guidance}))
        # llguidance reads the options with the schema: either may be what it refuses
        super().__init__(lm, lark, name or "JSONSchema",
                         arg="schema (or options)" if options else "schema")
