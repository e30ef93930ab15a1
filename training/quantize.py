"""int8 variants of an fp32 ONNX graph: the quantization recipes, one of which `mae-export` ships.

Integer GEMMs differ by instruction set. On x86 without VNNI, ONNX Runtime multiplies uint8
activations by int8 weights with VPMADDUBSW, whose pairwise int16 sums saturate (255 * 127 * 2 >
32767); with VNNI or AMX the same products are exact. A recipe that holds its gate on one CPU can
miss it on the other, so every recipe here is named by what it does, and `benchmarks/int8_recipes.py`
measures them on both kinds (the one without VNNI under emulation when the host has VNNI).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx

# The exporter's module path of a node, e.g. ": training.export.EncoderGraph/mae.blocks.0: model.mae.Block/...".
NAMESPACE = "namespace"
FIRST_BLOCK = re.compile(r"(?:^|[/. ])(?:decoder_)?blocks\.0:")


@dataclass(frozen=True)
class Int8Recipe:
    """How the MatMuls with a weight operand become integer ones (per output channel; the MatMuls of two
    activations, attention's q k^T and p v, always stay float).

    mode: `dynamic` quantizes activations at run time (per tensor, from each batch's min and max);
    `static` uses scales calibrated on real inputs, written as QuantizeLinear/DequantizeLinear pairs.
    weights: `s8` (u8 x s8 products: saturate without VNNI) or `u8` (u8 x u8: exact on every x86 CPU).
    reduce_range: 7-bit weights, so u8 x s8 pair sums cannot saturate (costs one bit of precision).
    float_first_block: the first transformer block of the graph stays float; its input (patch
    embeddings plus position embeddings, through LayerNorm) has the outliers that per-tensor
    activation scales crush, and it alone took the bundled model's latent cosine from 0.9998 to 0.88.
    float_fc2: the MLPs' second Linear (input after GELU) stays float, the usual outlier suspect.
    """

    name: str
    mode: Literal["dynamic", "static"] = "dynamic"
    weights: Literal["s8", "u8"] = "s8"
    reduce_range: bool = False
    float_first_block: bool = False
    float_fc2: bool = False


RECIPES: dict[str, Int8Recipe] = {r.name: r for r in (
    Int8Recipe("dynamic-s8"),
    Int8Recipe("dynamic-s8-reduce-range", reduce_range=True),
    Int8Recipe("dynamic-u8", weights="u8"),
    Int8Recipe("dynamic-s8-float-fc2", float_fc2=True),
    Int8Recipe("dynamic-s8-float-block0", float_first_block=True),
    Int8Recipe("dynamic-s8-reduce-range-float-block0", reduce_range=True, float_first_block=True),
    Int8Recipe("dynamic-u8-float-block0", weights="u8", float_first_block=True),
    Int8Recipe("static-s8", mode="static"),
    Int8Recipe("static-s8-reduce-range-float-block0", mode="static", reduce_range=True, float_first_block=True),
    Int8Recipe("static-u8-float-block0", mode="static", weights="u8", float_first_block=True),
)}
# Exact integer products on every x86 CPU (7-bit weights cannot saturate VPMADDUBSW) and fast where VNNI is;
# see the README's int8 table (benchmarks/int8_recipes.py) for the measurements behind the choice.
DEFAULT_RECIPE = "dynamic-s8-reduce-range-float-block0"


class CalibrationFeeds:
    """onnxruntime's CalibrationDataReader protocol over a list of feed dicts."""

    def __init__(self, feeds: Iterable[dict[str, np.ndarray]]):
        self._feeds = iter(list(feeds))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def float_matmuls(model: onnx.ModelProto, recipe: Int8Recipe) -> list[str]:
    """Names of the MatMul nodes the recipe leaves in float."""
    weights = {t.name for t in model.graph.initializer}
    producer = {out: node.op_type for node in model.graph.node for out in node.output}
    keep, first_block = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        namespace = next((p.value for p in node.metadata_props if p.key == NAMESPACE), "")
        in_first_block = bool(FIRST_BLOCK.search(namespace))
        first_block += [node.name] if in_first_block else []
        if (not any(name in weights for name in node.input) or (recipe.float_first_block and in_first_block)
                or (recipe.float_fc2 and producer.get(node.input[0]) == "Gelu")):
            keep.append(node.name)
    if recipe.float_first_block and not first_block:
        raise ValueError(f"int8 recipe {recipe.name}: no MatMul of a first transformer block found "
                         f"(the graph's nodes carry no exporter {NAMESPACE!r} metadata)")
    return keep


def quantize_int8(src: Path, dst: Path, recipe: Int8Recipe | str = DEFAULT_RECIPE,
                  calibration: Sequence[dict[str, np.ndarray]] | None = None) -> None:
    """Write the int8 variant of `src` to `dst`: MatMuls only, weights per output channel.

    ORT's integer kernels have no Gemm, so a head on pooled features stays float, and so does the one
    patch-embedding Conv. `calibration` (feed dicts of real inputs) is required by static recipes.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    recipe = RECIPES[recipe] if isinstance(recipe, str) else recipe
    exclude = float_matmuls(onnx.load(src, load_external_data=False), recipe)
    weight_type = QuantType.QInt8 if recipe.weights == "s8" else QuantType.QUInt8
    common = dict(op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=recipe.reduce_range,
                  weight_type=weight_type, nodes_to_exclude=exclude)
    if recipe.mode == "dynamic":
        quantize_dynamic(src, dst, **common)
        return
    if not calibration:
        raise ValueError(f"int8 recipe {recipe.name} is static: it needs calibration inputs")
    quantize_static(src, dst, CalibrationFeeds(calibration), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, calibrate_method=CalibrationMethod.MinMax,
                    calibration_providers=["CPUExecutionProvider"], **common)
