"""TensorRT's chain of engines, planned without TensorRT: device memory, bands, each part's profile.

A chain (engine/chain.py) holds at once: the image and everything handed from part to part on
the device (the prepared image, Noiseprint++, the encoder's four maps, the logits), the engines'
weights, and the activations of the part running, which is either the encoder on the whole
image or a band. The model below estimates each from the network's shape (architecture.py);
the coefficients are estimates, not measurements (no machine with TensorRT has run a chain
yet): docs/large-images.md says how they were reasoned and what TensorRT will report instead.
The same `MemoryModel` as the CPU's sizes the bands and refuses what cannot fit.
"""

from dataclasses import dataclass

from trufor_trt.architecture import DECODER_DIM, EMBED_DIMS, MLP_RATIO, NOISEPRINT_FEATURES, stage_grids
from trufor_trt.bands import DECODER_BAND_ROWS, NOISEPRINT_HALO
from trufor_trt.engine.memory_budget import GIB, BandPlan, MemoryModel
from trufor_trt.engine.tensorrt_plan import Profile

FLOAT32 = 4
# Bytes per value of the activations of Noiseprint++ and the encoder: INT8 engines keep
# Noiseprint++ in centered FP16 (precision/conv16.py) and most of the encoder in FP16.
ACTIVATION_BYTES = {"fp32": 4, "fp16": 2, "int8": 2}
# The CUDA context with TensorRT's, cuBLAS's and cuDNN's code and handles (about this much of a
# Jetson Orin's shared memory; a data-center GPU's context is smaller).
RUNTIME_BYTES = 1.0 * GIB
# Chains are built with this much tactic workspace at most: it bounds the scratch a layer's
# kernel may take, which TensorRT adds to the engine's device memory.
CHAIN_WORKSPACE_GIB = 1.0


def _channels_per_pixel(channels_per_cell, stride: int) -> float:
    return channels_per_cell / stride ** 2


def handoff_bytes_per_pixel() -> float:
    """float32 on the device between parts: image (3), Noiseprint++ (1), c1..c4 channels last,
    both decoders' logits (3 at 1/4)."""
    maps = sum(_channels_per_pixel(channels, 4 * 2 ** scale) for scale, channels in enumerate(EMBED_DIMS))
    return FLOAT32 * (3 + 1 + maps + _channels_per_pixel(3, 4))


def encoder_bytes_per_pixel(precision: str) -> float:
    """The encoder's largest set of live activations: at stage 1 (1/4 grid), both streams'
    tokens and one Mix-FFN's hidden layer in and out (MLP_RATIO x the width), with attention
    fused (no score matrix: TensorRT's MHA fusion); plus Noiseprint++ widened to 3 channels."""
    width = EMBED_DIMS[0]
    live = 2 * width + 2 * MLP_RATIO * width
    return ACTIVATION_BYTES[precision] * _channels_per_pixel(live, 4) + FLOAT32 * 3


def noiseprint_band_bytes_per_pixel(precision: str) -> float:
    """Per pixel of a band (halo included): two 64-channel activations, and the band's own
    input (3) and output (1) buffers."""
    return ACTIVATION_BYTES[precision] * 2 * NOISEPRINT_FEATURES + FLOAT32 * (3 + 1)


def decoder_bytes_per_cell() -> float:
    """Per 1/4-grid cell of a group (FP32 decoders): the three coarse scales widened to the
    grid's width (both decoders: 2 x DECODER_DIM channels each), and a band's summed map."""
    return FLOAT32 * 2 * DECODER_DIM * (3 + 1)


def device_memory_model(precision: str, weight_bytes: float) -> MemoryModel:
    """The chain's device memory, in the CPU memory model's terms."""
    return MemoryModel(fixed_bytes=RUNTIME_BYTES + weight_bytes + CHAIN_WORKSPACE_GIB * GIB,
                       bytes_per_pixel=handoff_bytes_per_pixel() + encoder_bytes_per_pixel(precision),
                       noiseprint_bytes_per_pixel=noiseprint_band_bytes_per_pixel(precision),
                       decoder_bytes_per_cell=decoder_bytes_per_cell())


# Jetson modules as TensorRT sees them: the memory CUDA reports as total (shared with the CPU),
# and what a headless JetPack leaves free of it (estimates; jetson-containers#342 for 7.3 GiB).
JETSONS = (("Orin Nano 4GB", 3.3, 2.3), ("Orin Nano 8GB", 7.3, 6.0), ("Orin NX 8GB", 7.3, 6.0),
           ("Orin NX 16GB", 15.3, 14.0), ("AGX Orin 32GB", 30.6, 29.0), ("AGX Orin 64GB", 61.4, 59.5))


@dataclass(frozen=True)
class PartProfile:
    """One chain part's optimization profile: input name -> (min, opt, max) shapes."""

    part: str
    inputs: dict

    def as_dict(self) -> dict:
        return {name: [list(shape) for shape in shapes] for name, shapes in self.inputs.items()}

    def describe(self) -> str:
        return "; ".join(f"{name} {'x'.join(map(str, shapes[0]))} .. {'x'.join(map(str, shapes[2]))}"
                         for name, shapes in self.inputs.items())


def _coarse_rows(group_rows: int, reduction: int, coarse_height: int) -> int:
    """The most rows of a coarse scale `reduction` times smaller that `group_rows` 1/4-grid rows
    read (bilinear taps: the rows they fall between, plus one at each end)."""
    return min(coarse_height, -(-group_rows // reduction) + 2)


def part_profiles(profile: Profile, plan: BandPlan) -> list:
    """Each part's profile for images in `profile` run in bands of at most `plan`'s heights."""
    (min_h, min_w), (opt_h, opt_w), (max_h, max_w) = profile.min, profile.opt, profile.max
    small, typical, large = (stage_grids(*size) for size in (profile.min, profile.opt, profile.max))
    band_in = min(max_h, plan.noiseprint_rows + 2 * NOISEPRINT_HALO)
    shortest_band = min(min_h, NOISEPRINT_HALO + 1)  # a last band: one row and its halo above
    image = [(1, 3, min_h, min_w), (1, 3, opt_h, opt_w), (1, 3, max_h, max_w)]
    noiseprint = [(1, 1, *shape[2:]) for shape in image]

    def rows(channels: int, most_rows: int, widths: tuple) -> list:
        return [(1, widths[0], channels), (min(most_rows, max(1, typical[0][0])), widths[1], channels),
                (most_rows, widths[2], channels)]

    grid_widths = (small[0][1], typical[0][1], large[0][1])
    maps_inputs = {"c1_rows": rows(EMBED_DIMS[0], plan.decoder_rows, grid_widths)}
    band_inputs = {"c1_rows": rows(EMBED_DIMS[0], DECODER_BAND_ROWS, grid_widths)}
    wide, vertical = {}, {}
    for scale in (3, 2, 1):  # c4, c3, c2: the decoder graphs' order
        name, reduction = f"c{scale + 1}", 2 ** scale
        group_rows = _coarse_rows(plan.decoder_rows, reduction, large[scale][0])
        band_rows = _coarse_rows(DECODER_BAND_ROWS, reduction, large[scale][0])
        maps_inputs[f"{name}_rows"] = rows(EMBED_DIMS[scale], group_rows,
                                           (small[scale][1], typical[scale][1], large[scale][1]))
        wide[f"{name}_wide"] = rows(2 * DECODER_DIM, band_rows, grid_widths)
        vertical[f"{name}_vertical"] = [(1, 1), (DECODER_BAND_ROWS, band_rows), (DECODER_BAND_ROWS, band_rows)]
    return [PartProfile("noiseprint", {"image": [(1, 3, shortest_band, min_w), (1, 3, band_in, opt_w),
                                                 (1, 3, band_in, max_w)]}),
            PartProfile("encoder", {"image": image, "noiseprint": noiseprint}),
            PartProfile("decoder-maps", maps_inputs),
            PartProfile("decoder-band", {**band_inputs, **wide, **vertical})]


@dataclass(frozen=True)
class ChainPlan:
    """What `build` makes for images up to a max shape: the band heights, each part's profile and
    the device memory it expects the largest image to take."""

    precision: str
    profile: Profile
    bands: BandPlan
    parts: list
    estimated_bytes: float

    def describe(self) -> list:
        """Lines for the console."""
        height, width = self.profile.max
        lines = [f"a chain of {len(self.parts)} {self.precision} engines for images up to {height}x{width} "
                 f"(HxW): Noiseprint++ in bands of {self.bands.noiseprint_rows} rows, the encoder whole, "
                 f"the decoders in groups of {self.bands.decoder_rows} rows of the 1/4 grid"]
        lines += [f"  {part.part}: {part.describe()}" for part in self.parts]
        lines.append(f"  device memory at {height}x{width}: about {self.estimated_bytes / GIB:.1f} GiB (estimated)")
        return lines


def plan_chain(precision: str, profile: Profile, weight_bytes: float, budget_bytes=None) -> ChainPlan:
    """The chain for `profile` within `budget_bytes` of device memory (None: the preferred band
    sizes); MemoryBudgetError, naming what would fit, when its largest image cannot."""
    model = device_memory_model(precision, weight_bytes)
    height, width = profile.max
    bands = model.plan(height, width, budget_bytes)
    return ChainPlan(precision, profile, bands, part_profiles(profile, bands),
                     model.needed_bytes(height, width, bands))
