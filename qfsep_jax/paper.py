"""Every published number this project compares against, with its source.

Sources are the papers' own tables and figures (``../shared/docs/paper.md`` holds the text of
Sheng et al. 2018). Figure values read off a plot carry that plot's precision.
"""

from __future__ import annotations

# Published top-1 (%) on all 50k ImageNet val images, MobileNetV1 1.0/224 (../shared/docs/paper.md).
TABLE1_TOP1 = {
    "float": (70.50, "Sheng et al. 2018"),
    "tf8_per_tensor": (1.80, "Sheng et al. 2018"),
    "tf8_zero_variance_fix": (45.73, "Sheng et al. 2018"),
    "per_channel": (70.3, "Krishnamoorthi 2018"),
    "cle_per_tensor": (70.51, "Nagel et al. 2019, CLE + bias correction"),
}

# The paper's Figure 3 (../shared/docs/paper.md §4): α of the 32 channels of Conv2d_1_depthwise
# of the TF-slim float MobileNetV1 1.0/224, as printed (6 significant digits).
FIG3_LAYER = "Conv2d_1_depthwise"
FIG3_ALPHA = (
    21.5191,
    0.223199,
    1.08687,
    14.1944,
    0.863097,
    0.183423,
    0.101928,
    0.194357,
    24.2374,
    0.0637057,
    0.113416,
    1.48599,
    0.299164,
    0.6962,
    0.932557,
    3.70812,
    14.8428,
    0.0413136,
    0.184471,
    0.228431,
    17.1846,
    30.6505,
    0.114515,
    1.3315,
    0.214905,
    0.627026,
    0.0899751,
    0.199664,
    0.0595126,
    0.461869,
    0.339099,
    0.229413,
)

# The paper's Figure 4 (../shared/docs/paper.md §3), values read off the plot (±1 dB at best), dB.
FIG4_SQNR: dict[str, dict[str, float]] = {
    "original": {
        "Conv2d_0": 30,
        "Conv2d_1_depthwise": 12,
        "Conv2d_1_pointwise": 8,
        "Conv2d_2_depthwise": 7,
        "Conv2d_2_pointwise": 7,
        "Conv2d_6_depthwise": 6,
        "Conv2d_6_pointwise": 4,
        "Conv2d_12_depthwise": 7,
        "Conv2d_12_pointwise": 3,
        "Conv2d_13_depthwise": 3,
    },
    "qf_relu6": {
        "Conv2d_0": 28,
        "Conv2d_1_depthwise": 20,
        "Conv2d_1_pointwise": 12,
        "Conv2d_2_depthwise": 12,
        "Conv2d_2_pointwise": 11,
        "Conv2d_6_depthwise": 9,
        "Conv2d_6_pointwise": 8,
        "Conv2d_12_depthwise": 7,
        "Conv2d_12_pointwise": 4,
        "Conv2d_13_depthwise": 5,
    },
    "qf_relu": {
        "Conv2d_0": 30,
        "Conv2d_1_depthwise": 22,
        "Conv2d_1_pointwise": 20,
        "Conv2d_2_depthwise": 20,
        "Conv2d_2_pointwise": 17,
        "Conv2d_6_depthwise": 13,
        "Conv2d_6_pointwise": 13,
        "Conv2d_12_depthwise": 11,
        "Conv2d_12_pointwise": 8,
        "Conv2d_13_depthwise": 10,
    },
}

# The paper's Figure 5 / Table 3: ImageNet2012 val top-1 (%) of MobileNetV1 1.0/224 with each
# core-layer design, in float and after 8-bit post-training quantization
# (../shared/docs/paper.md §6).
FIG5_TOP1: dict[str, dict[str, float]] = {
    "original": {"float": 70.50, "8bit": 1.80},
    "qf_relu6": {"float": 70.55, "8bit": 61.50},
    "qf_relu": {"float": 70.80, "8bit": 67.80},
    "qf_relu_l2dw": {"float": 70.77, "8bit": 68.03},
}
