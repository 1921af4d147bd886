"""tools/profile_train.py: the split of wall time among overlapping trace events."""

import pytest

from tools import profile_train


def _event(name, ts, dur):
    return {"name": name, "ts": ts, "dur": dur, "ph": "X"}


def test_wall_shares_split_overlaps_and_count_gaps():
    events = [
        _event("a", 0, 10),  # alone 0-4, with b 4-10
        _event("b", 4, 8),  # with a 4-10, alone 10-12
        _event("c", 15, 5),  # gap 12-15, alone 15-20
        _event("c", 16, 2),  # the same op on a second thread: two shares of c there
        _event("d", 20, 0),  # empty: ignored
    ]
    shares, idle, span = profile_train.wall_shares(events)
    assert span == 20 and idle == 3
    assert shares["a"] == pytest.approx(4 + 3) and shares["b"] == pytest.approx(3 + 2)
    assert shares["c"] == pytest.approx(5) and "d" not in shares
    assert sum(shares.values()) + idle == pytest.approx(span)


def test_wall_shares_of_nothing():
    assert profile_train.wall_shares([]) == ({}, 0.0, 0.0)


@pytest.mark.parametrize(
    "kind, layer, expected",
    [
        ("dot", "pointwise", "pointwise conv"),  # XLA
        ("Conv2d", "pointwise", "pointwise conv"),  # PyTorch module
        ("custom-call", "depthwise", "depthwise conv"),
        ("Conv2d", "depthwise", "depthwise conv"),
        ("convolution", "other", "stem conv"),  # XLA's kernel-gradient conv has no op_name
        ("slice", "Conv2d_0", "stem conv"),
        ("custom-call", "Conv2d_0", "stem conv"),  # the native kernel gradient
        ("custom-call (BN sums)", "depthwise", "BN, activations, elementwise"),
        ("custom-call (BN sums)", "Conv2d_0", "BN, activations, elementwise"),
        ("pad", "Conv2d_0", "stem conv"),  # its SAME padding
        ("pad", "depthwise", "BN, activations, elementwise"),
        ("reduce", "Conv2d_0", "BN, activations, elementwise"),
        ("divide+select", "depthwise", "BN, activations, elementwise"),
        ("BatchNorm2d", "-", "BN, activations, elementwise"),
        ("idle (no XLA op running)", "-", "idle / outside ops"),
        ("dot", "Logits", "other (classifier, loss, optimizer)"),
    ],
)
def test_components_group_both_frameworks_alike(kind, layer, expected):
    assert profile_train.component(kind, layer) == expected


def test_hlo_instructions_tell_the_native_bn_sums_from_the_conv_kernels():
    hlo = "\n".join(
        [
            "ENTRY %main (p: f32[2,4]) -> f32[2,4] {",
            "  %p = f32[2,4]{1,0} parameter(0)",
            "  %ffi_call.1 = f32[2,4]{1,0} custom-call(%p), "
            'custom_call_target="qfsep_bn_grad_sums", '
            'metadata={op_name="jit(s)/transpose(jvp(MobileNetV1))/Conv2d_1/depthwise/ffi_call"}',
            "  ROOT %ffi_call.2 = f32[2,4]{1,0} custom-call(%p), "
            'custom_call_target="qfsep_depthwise3x3_forward", '
            'metadata={op_name="jit(s)/jvp(MobileNetV1)/Conv2d_1/depthwise/ffi_call"}',
            "}",
        ]
    )
    ops = profile_train.hlo_instructions(hlo)
    bn, conv = (profile_train.category(ops[n]) for n in ("ffi_call.1", "ffi_call.2"))
    assert bn == ("custom-call (BN sums)", "bwd", "depthwise")
    assert conv == ("custom-call", "fwd", "depthwise")
    assert profile_train.component(bn[0], bn[2]) == "BN, activations, elementwise"
    assert profile_train.component(conv[0], conv[2]) == "depthwise conv"
