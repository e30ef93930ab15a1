"""The JSON response of every route: orjson, so numpy arrays (embeddings, masks) serialize natively.

orjson writes a float32 array in its shortest round-trip form (`0.37392333`), about 25x faster than
`json.dumps(array.tolist())` and half the bytes; NaN and infinities become `null`.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse as _StarletteJSONResponse

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


class JSONResponse(_StarletteJSONResponse):
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_OPTIONS)
