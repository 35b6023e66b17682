"""The two layouts of ModelInfer's one input, and which of them a model advertises (no imports: the repository and
the tensor parser both use it)."""

import enum


def image_dims(datatype: str, input_size: int) -> list[int]:
    """One image's shape, without the batch dimension: UINT8 raw images are NHWC [S, S, 3], as images are decoded;
    FP32/FP16 normalized ones NCHW [3, S, S], as the network takes them."""
    return [input_size, input_size, 3] if datatype == "UINT8" else [3, input_size, input_size]


class AdvertisedInput(enum.StrEnum):
    """The input layout ModelMetadata and ModelConfig advertise (the repository's `advertised_input`); ModelInfer
    accepts both whatever is advertised."""

    FP32_NCHW = "fp32_nchw"
    UINT8_NHWC = "uint8_nhwc"

    @property
    def datatype(self) -> str:
        return "UINT8" if self is AdvertisedInput.UINT8_NHWC else "FP32"

    def dims(self, input_size: int) -> list[int]:
        return image_dims(self.datatype, input_size)
