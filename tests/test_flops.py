"""Tests for m2net_jax.flops: the analytic counts against XLA's cost analysis of the real modules.

XLA's `cost_analysis()['flops']` differs from the field's FLOPs in two ways, so the comparison is
made in two steps:
  * XLA counts only the kernel taps that land on the image, not on the zero padding. Collecting
    the model's convolutions and matrix products from its jaxpr and compiling them with the
    padding moved into the operands' shapes gives XLA's count of exactly what `flops` counts:
    the two must agree exactly.
  * XLA also counts element-wise work (batch norm, ReLU, the policy mask, pooling). The whole
    compiled model, minus the padding taps, must exceed the analytic count by less than 5%.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from m2net_jax import flops, models
from m2net_jax.models import policy_network, recognizer


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jaxlibs: one dict per program
        cost = cost[0]
    return float(cost["flops"])


def _matmul_equations(jaxpr):
    """The conv and dot_general equations of a jaxpr, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
            yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax_core.ClosedJaxpr):
                    yield from _matmul_equations(sub.jaxpr)
                elif isinstance(sub, jax_core.Jaxpr):
                    yield from _matmul_equations(sub)


def _xla_matmul_flops(fn, *args, count_padding: bool) -> float:
    """XLA's FLOPs of the convolutions and dense layers `fn` runs, one program for all of them.

    With `count_padding`, each conv's input arrives already padded (and the conv pads nothing),
    so XLA counts every kernel tap, as the field's FLOPs do.
    """
    equations = list(_matmul_equations(jax.make_jaxpr(fn)(*args).jaxpr))
    operands, all_params = [], []
    for eqn in equations:
        lhs, rhs = (v.aval for v in eqn.invars)
        params = dict(eqn.params)
        lhs_shape = list(lhs.shape)
        if eqn.primitive.name == "conv_general_dilated" and count_padding:
            for dim, (low, high) in zip(
                params["dimension_numbers"].lhs_spec[2:], params["padding"], strict=True
            ):
                lhs_shape[dim] += low + high
            params["padding"] = tuple((0, 0) for _ in params["padding"])
        operands.append(
            (jax.ShapeDtypeStruct(lhs_shape, lhs.dtype), jax.ShapeDtypeStruct(rhs.shape, rhs.dtype))
        )
        all_params.append(params)

    def run_all(operands):
        # Operands are arguments, not constants, so XLA cannot merge identical ops.
        return [
            eqn.primitive.bind(lhs, rhs, **params)
            for eqn, params, (lhs, rhs) in zip(equations, all_params, operands, strict=True)
        ]

    return _xla_flops(run_all, operands)


def _check_against_xla(fn, args, analytic):
    every_tap = _xla_matmul_flops(fn, *args, count_padding=True)
    on_image_taps = _xla_matmul_flops(fn, *args, count_padding=False)
    whole_model = _xla_flops(fn, *args)
    assert every_tap == analytic
    elementwise = whole_model - on_image_taps  # what XLA adds beyond convs and dense layers
    assert 0 < elementwise < 0.05 * analytic
    return whole_model


def test_architecture_tables_match_the_models():
    assert flops.BLOCKS_PER_STAGE == models.BLOCKS_PER_STAGE
    assert flops._STAGE_STRIDES == recognizer.STAGE_STRIDES
    assert flops._EXPANSION == recognizer.EXPANSION
    assert flops._RESNET10_STAGES == policy_network.RESNET10_STAGES
    assert flops._LOC_MLP_FEATURES == (8, *policy_network.LOC_MLP_FEATURES)


@pytest.mark.parametrize(
    "depth, image_size, stem, width",
    [
        (29, 32, "small", 32),
        (47, 32, "small", 32),
        (29, 224, "imagenet", 64),
        (47, 224, "imagenet", 64),
    ],
)
def test_recognizer_flops_match_xla_cost_analysis(depth, image_size, stem, width):
    # Nothing runs, only compiles, and compile time hardly depends on width or image size, so
    # the paper's size costs no more than a toy's.
    kwargs = dict(depth=depth, num_classes=420, width=width, stem=stem)
    model = models.Recognizer(**kwargs)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    policy = jax.ShapeDtypeStruct((1, model.num_blocks), jnp.float32)  # all-ones: an argument
    variables = jax.eval_shape(model.init, jax.random.key(0), images, policy)
    analytic = flops.recognizer_flops(**kwargs, image_size=image_size).full
    whole_model = _check_against_xla(model.apply, (variables, images, policy), analytic)
    # Padding taps (2-4% here) and element-wise work (1-2%) nearly cancel in XLA's raw count.
    # (Not so on 4×4 feature maps, e.g. 64 px with the ImageNet stem: padding is then 7-8%.)
    assert abs(whole_model - analytic) < 0.05 * analytic


@pytest.mark.parametrize(
    "image_size, stem, use_geo", [(24, "small", True), (112, "imagenet", False)]
)
def test_policy_network_flops_match_xla_cost_analysis(image_size, stem, use_geo):
    # Policy images are small, so ResNet-10's last maps are 3×3 to 4×4 and XLA's raw count is
    # 11-21% below the analytic one: most of that is padding taps, which only step 1 sees.
    # (At 16 px the last block's 2×2 maps go through SmallMapConv, which computes its 3×3 conv
    # on the map padded to 3×3 to dodge an XLA:CPU slow path: 9/4 of the taps the model's
    # arithmetic needs. The analytic count is the model's arithmetic, so 24 px is checked.)
    kwargs = dict(num_blocks=15, width=32, stem=stem, use_geo=use_geo)
    model = models.PolicyNetwork(**kwargs)
    images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    locations = jax.ShapeDtypeStruct((1, 8), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, locations)
    analytic = flops.policy_network_flops(**kwargs, image_size=image_size)
    _check_against_xla(model.apply, (variables, images, locations), analytic)


def test_flops_per_image_counts_kept_blocks_and_always_the_downsamples():
    costs = flops.recognizer_flops(depth=47, num_classes=420)
    n = 15
    assert costs.blocks.shape == costs.downsamples.shape == (n,)
    assert np.flatnonzero(costs.downsamples).tolist() == [0, 5, 10]  # each stage's first block
    rng = np.random.default_rng(0)
    policies = rng.random((6, n)) < 0.5
    policies[0], policies[1] = True, False
    per_image = flops.flops_per_image(policies, costs)
    for i, policy in enumerate(policies):
        kept = sum(int(costs.blocks[j]) for j in range(n) if policy[j])
        expected = costs.stem + int(costs.downsamples.sum()) + costs.classifier + kept
        assert per_image[i] == expected
    assert per_image[0] == costs.full
    assert per_image[1] == costs.fixed
    policy_cost = flops.policy_network_flops(num_blocks=n, image_size=112)
    total = flops.flops_per_image(policies, costs, policy_network=policy_cost)
    np.testing.assert_array_equal(total, per_image + policy_cost)


def test_stem_and_classifier_flops_follow_the_conv_formula():
    # 224 px: the 7×7/2 stem conv has a 112×112 output; the classifier maps 16·width features.
    costs = flops.recognizer_flops(depth=29, num_classes=420, width=64, image_size=224)
    assert costs.stem == 2 * 112 * 112 * 7 * 7 * 3 * 64
    assert costs.classifier == 2 * 1024 * 420
    small = flops.recognizer_flops(depth=29, num_classes=10, width=8, image_size=32, stem="small")
    assert small.stem == 2 * 32 * 32 * 3 * 3 * 3 * 8


def test_location_mlp_is_counted_only_with_geo():
    with_geo = flops.policy_network_flops(num_blocks=15, image_size=112, use_geo=True)
    without = flops.policy_network_flops(num_blocks=15, image_size=112, use_geo=False)
    assert with_geo - without == 2 * (8 * 128 + 128 * 256 + 256 * 256 + 256 * 128 + 128 * 15)


def test_unknown_conv_type_or_policy_width_is_a_clear_error():
    with pytest.raises(ValueError, match="conv_type"):
        flops.recognizer_flops(depth=29, num_classes=10, conv_type="octconv")
    costs = flops.recognizer_flops(depth=29, num_classes=10)
    with pytest.raises(ValueError, match="9"):
        flops.flops_per_image(np.ones((2, 15)), costs)


# --- Compact backbones (§4.4) and M²Net+ ---------------------------------------------------------


def test_conv_type_tables_match_the_models():
    assert set(flops.CONV1X1_FLOPS) == set(flops.CONV3X3_FLOPS) == set(models.CONV_TYPES)
    assert flops._GEO_EMBED_HIDDEN == recognizer.GEO_EMBED_HIDDEN


def _depthwise_taps(width):
    """FLOPs of the depthwise 3×3 convs of a ResNet-29 on 32 px photos with the small stem:
    three blocks per stage on 32², 16², 8² maps, of width·(1, 2, 4) channels."""
    return sum(3 * 2 * hw * hw * 9 * width * 2**s for s, hw in enumerate((32, 16, 8)))


@pytest.mark.parametrize(
    "conv_type, geo_conditioning",
    [
        ("mobilenet", False),
        ("shufflenet_g2", False),
        ("shufflenet_g4", False),
        ("hetconv_p2", False),
        ("hetconv_p4", True),  # M²Net+ on a compact backbone: both extensions at once
    ],
)
def test_compact_backbone_flops_match_xla_cost_analysis(conv_type, geo_conditioning):
    kwargs = dict(
        depth=29,
        num_classes=420,
        width=32,
        stem="small",
        conv_type=conv_type,
        geo_conditioning=geo_conditioning,
    )
    model = models.Recognizer(**kwargs)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    policy = jax.ShapeDtypeStruct((1, model.num_blocks), jnp.float32)
    locations = jax.ShapeDtypeStruct((1, 8), jnp.float32)

    def forward(variables, images, policy, locations):
        return model.apply(variables, images, policy, locations=locations)

    variables = jax.eval_shape(
        lambda key, x, p, loc: model.init(key, x, p, locations=loc),
        jax.random.key(0),
        images,
        policy,
        locations,
    )
    args = (variables, images, policy, locations)
    analytic = flops.recognizer_flops(**kwargs, image_size=32).full
    # Depthwise convs run as shifted per-channel products (models.layers.DepthwiseConv), which
    # XLA counts among the element-wise ops: k² multiplies and k² − 1 adds per output.
    depthwise = _depthwise_taps(32) if conv_type.split("_")[0] in ("mobilenet", "shufflenet") else 0
    assert _xla_matmul_flops(forward, *args, count_padding=True) + depthwise == analytic
    elementwise = _xla_flops(forward, *args) - _xla_matmul_flops(
        forward, *args, count_padding=False
    )
    # Compact convs do few multiply-adds per activation, so batch norm and ReLU weigh more.
    assert 0 < elementwise - depthwise * 17 / 18 < 0.25 * analytic


def test_compact_backbones_count_their_bottleneck_convs():
    # ResNet-29, 224 px, width 64: stage 2's second block maps 512 → 128 → 128 → 512 on 28×28.
    hw, c_in, f, c_out = 28 * 28, 512, 128, 512

    def block(conv_type):
        return int(flops.recognizer_flops(depth=29, num_classes=10, conv_type=conv_type).blocks[4])

    conv1, conv3 = 2 * hw * c_in * f, 2 * hw * f * c_out
    assert block("standard") == conv1 + 2 * hw * 9 * f * f + conv3
    assert block("mobilenet") == conv1 + 2 * hw * (9 * f + f * f) + conv3
    for g in (2, 4):  # grouped 1×1s at 1/G, depthwise 3×3
        assert block(f"shufflenet_g{g}") == (conv1 + conv3) // g + 2 * hw * 9 * f
    for p in (2, 4):  # each filter: f/P channels 3×3, the rest 1×1 (HetConv's Eqn)
        assert block(f"hetconv_p{p}") == conv1 + 2 * hw * f * (9 * f // p + f - f // p) + conv3
    plus = flops.recognizer_flops(depth=29, num_classes=10, geo_conditioning=True)
    plain = flops.recognizer_flops(depth=29, num_classes=10)
    assert plus.fixed - plain.fixed == plus.geo_embedding == 2 * (8 * 128 + 128 * 1024)
    np.testing.assert_array_equal(plus.blocks, plain.blocks)
