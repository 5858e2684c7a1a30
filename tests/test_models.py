"""Tests for m2net_jax.models: paper-size shapes, BlockDrop's block semantics, the policy network.

The recognizer is checked against a plain ResNet forward pass written here from the parameter
arrays with `lax.conv_general_dilated` (`_reference_logits`), in which a dropped block is simply
not run: its output is its shortcut, the identity or the downsample.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from m2net_jax.models import PolicyNetwork, Recognizer
from m2net_jax.models.layers import channel_shuffle
from m2net_jax.models.recognizer import GeoEmbedding

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LOCATION_SCALE = np.array([1, 90, 60, 60, 1, 180, 60, 60], np.float32)

TINY = dict(depth=29, num_classes=5, width=8, stem="small")  # N = 9; stages start at 0, 3, 6
BATCH = 4


# --- Independent definitions -------------------------------------------------------------------


def _conv(x, kernel, stride, pad):
    return lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        [(pad, pad), (pad, pad)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def _bn(x, params, stats):
    return (x - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * params["scale"] + params["bias"]


def _conv_bn(x, params, stats, stride, pad):
    return _bn(_conv(x, params["conv"]["kernel"], stride, pad), params["bn"], stats["bn"])


def _standard_kernels(block_params):
    """The dense kernels of a block's conv1, conv2, conv3 ('standard': they are the parameters)."""
    return tuple(block_params[name]["kernel"] for name in ("conv1", "conv2", "conv3"))


def _reference_logits(
    variables, images, *, stem, blocks_per_stage, dropped=(), dense_kernels=_standard_kernels
):
    """Eval-mode ResNet from the variables; blocks in `dropped` pass only their shortcut on.

    `dense_kernels(block_params)` gives the dense (HWIO) kernels equivalent to a block's three
    convs, so compact backbones reuse this forward pass."""
    params, stats = variables["params"], variables["batch_stats"]
    x = (images - IMAGENET_MEAN) / IMAGENET_STD
    if stem == "small":
        x = jax.nn.relu(_conv_bn(x, params["stem"], stats["stem"], 1, 1))
    else:
        x = jax.nn.relu(_conv_bn(x, params["stem"], stats["stem"], 2, 3))
        x = lax.reduce_window(
            x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), [(0, 0), (1, 1), (1, 1), (0, 0)]
        )
    n = 0
    for stage in (1, 2, 3):
        for i in range(blocks_per_stage):
            stride = 2 if stage > 1 and i == 0 else 1
            if i == 0:
                ds = f"stage{stage}_downsample"
                shortcut = _conv_bn(x, params[ds], stats[ds], stride, 0)
            else:
                shortcut = x
            if n in dropped:
                x = shortcut
            else:
                p, s = params[f"stage{stage}_block{i}"], stats[f"stage{stage}_block{i}"]
                k1, k2, k3 = dense_kernels(p)
                y = jax.nn.relu(_bn(_conv(x, k1, 1, 0), p["bn1"], s["bn1"]))
                y = jax.nn.relu(_bn(_conv(y, k2, stride, 1), p["bn2"], s["bn2"]))
                y = _bn(_conv(y, k3, 1, 0), p["bn3"], s["bn3"])
                x = jax.nn.relu(shortcut + y)
            n += 1
    return x.mean(axis=(1, 2)) @ params["classifier"]["kernel"] + params["classifier"]["bias"]


def _random_variables(model, *inputs, seed, **kwargs):
    """Variables of `model` filled with random numbers, so no block is trivially the identity (the
    last BN of each block starts with γ = 0). numpy fills them: compiling Flax's initialisers
    would cost seconds per model."""
    shapes = jax.eval_shape(functools.partial(model.init, **kwargs), jax.random.key(0), *inputs)
    rng = np.random.default_rng(seed)

    def fill(path, shape):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, shape.shape), jnp.float32)
        return jnp.asarray(0.3 * rng.standard_normal(shape.shape), jnp.float32)

    return jax.tree.map_with_path(fill, shapes)


def _bottleneck_params(c_in, features, conv_type="standard"):
    # conv1 1×1, conv2 3×3, conv3 1×1 (×4), three BNs (scale + bias).
    f = features
    convs = {
        "standard": c_in * f + 9 * f**2 + 4 * f**2,
        # Depthwise 3×3 (9 per channel) + pointwise 1×1.
        "mobilenet": c_in * f + (9 * f + f**2) + 4 * f**2,
        # Grouped 1×1s see 1/G of their inputs; depthwise 3×3.
        "shufflenet_g2": (c_in * f + 4 * f**2) // 2 + 9 * f,
        "shufflenet_g4": (c_in * f + 4 * f**2) // 4 + 9 * f,
        # Each of the f filters: 3×3 on f/P input channels, 1×1 on the other f − f/P.
        "hetconv_p2": c_in * f + f * (9 * f // 2 + f // 2) + 4 * f**2,
        "hetconv_p4": c_in * f + f * (9 * f // 4 + 3 * f // 4) + 4 * f**2,
    }[conv_type]
    return convs + 2 * (f + f + 4 * f)


def _recognizer_param_count(*, blocks_per_stage, width, num_classes, conv_type="standard"):
    count = 7 * 7 * 3 * width + 2 * width  # stem conv + BN
    c_in = width
    for stage in range(3):
        features = width * 2**stage
        count += c_in * 4 * features + 2 * 4 * features  # downsample conv + BN
        for _ in range(blocks_per_stage):
            count += _bottleneck_params(c_in, features, conv_type)
            c_in = 4 * features
    return count + c_in * num_classes + num_classes


def _policy_param_count(*, num_blocks, width, use_geo):
    count = 7 * 7 * 3 * width + 2 * width
    c_in = width
    for multiplier in (1, 2, 4, 8):
        f = width * multiplier
        count += 9 * c_in * f + 9 * f * f + 4 * f  # two 3×3 convs + two BNs
        if c_in != f:
            count += c_in * f + 2 * f  # downsample conv + BN
        c_in = f
    count += c_in * num_blocks + num_blocks
    if use_geo:
        sizes = (8, 128, 256, 256, 128, num_blocks)
        count += sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:], strict=True))
    return count


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


# --- Fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    """A tiny ResNet-29 at 32 px with random variables, its jitted eval forward, and a batch."""
    model = Recognizer(**TINY)
    images = jax.random.uniform(jax.random.key(0), (BATCH, 32, 32, 3))
    ones = jnp.ones((BATCH, model.num_blocks))
    variables = _random_variables(model, images, ones, seed=2)
    forward = jax.jit(lambda v, x, p: model.apply(v, x, p))
    return model, variables, images, forward


# --- Recognizer --------------------------------------------------------------------------------


@pytest.mark.parametrize("depth, num_blocks", [(29, 9), (47, 15), (65, 21)])
def test_depth_gives_paper_block_count_and_parameters(depth, num_blocks):
    model = Recognizer(depth=depth, num_classes=420, width=64, stem="imagenet")
    assert model.num_blocks == num_blocks
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    policy = jax.ShapeDtypeStruct((2, num_blocks), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, policy)
    logits = jax.eval_shape(model.apply, variables, images, policy)
    assert logits.shape == (2, 420) and logits.dtype == jnp.float32
    blocks = [k for k in variables["params"] if "_block" in k]
    assert len(blocks) == num_blocks
    expected = _recognizer_param_count(blocks_per_stage=num_blocks // 3, width=64, num_classes=420)
    assert _count(variables["params"]) == expected


def test_unknown_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="depth 50"):
        _ = Recognizer(depth=50).num_blocks


def test_policy_of_wrong_shape_is_a_clear_error(tiny):
    model, variables, images, _ = tiny
    with pytest.raises(ValueError, match="policy has shape"):
        model.apply(variables, images, jnp.ones((BATCH, model.num_blocks + 1)))


@pytest.mark.parametrize("stem, size", [("small", 32), ("imagenet", 64)])
def test_all_ones_policy_is_a_plain_resnet(stem, size):
    model = Recognizer(**{**TINY, "stem": stem})
    images = jax.random.uniform(jax.random.key(3), (2, size, size, 3))
    ones = jnp.ones((2, model.num_blocks))
    variables = _random_variables(model, images, ones, seed=5)
    forward = jax.jit(lambda v, x, p: model.apply(v, x, p))
    expected = _reference_logits(variables, images, stem=stem, blocks_per_stage=3)
    np.testing.assert_allclose(forward(variables, images, ones), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        forward(variables, images, ones.astype(bool)), expected, rtol=1e-4, atol=1e-4
    )


def test_dropped_block_equals_identity_shortcut(tiny):
    model, variables, images, forward = tiny
    policy = jnp.ones((BATCH, model.num_blocks)).at[:, 4].set(0)  # block 1 of stage 2
    logits = forward(variables, images, policy)
    expected = _reference_logits(variables, images, stem="small", blocks_per_stage=3, dropped={4})
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    full = forward(variables, images, jnp.ones_like(policy))
    assert np.abs(np.asarray(logits - full)).max() > 1e-2  # dropping it did change something


def test_dropped_first_block_equals_downsample(tiny):
    model, variables, images, forward = tiny
    policy = jnp.ones((BATCH, model.num_blocks)).at[:, 3].set(0)  # first block of stage 2
    logits = forward(variables, images, policy)
    expected = _reference_logits(variables, images, stem="small", blocks_per_stage=3, dropped={3})
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    full = forward(variables, images, jnp.ones_like(policy))
    assert np.abs(np.asarray(logits - full)).max() > 1e-2


def test_each_sample_follows_its_own_policy(tiny):
    model, variables, images, forward = tiny
    dropped_per_sample = [(), (0,), (1, 2, 6), tuple(range(9))]
    policy = np.ones((BATCH, model.num_blocks), np.float32)
    for i, dropped in enumerate(dropped_per_sample):
        policy[i, list(dropped)] = 0
    logits = forward(variables, images, policy)
    for i, dropped in enumerate(dropped_per_sample):
        # The whole batch through the reference, every sample dropping `dropped`; keep row i.
        expected = _reference_logits(
            variables, images, stem="small", blocks_per_stage=3, dropped=set(dropped)
        )
        np.testing.assert_allclose(logits[i], expected[i], rtol=1e-4, atol=1e-4)


def test_logits_do_not_depend_on_other_samples_policies(tiny):
    model, variables, images, forward = tiny
    rng = np.random.default_rng(0)
    policy_a = rng.integers(0, 2, (BATCH, model.num_blocks)).astype(np.float32)
    policy_b = rng.integers(0, 2, (BATCH, model.num_blocks)).astype(np.float32)
    policy_b[0] = policy_a[0]
    logits_a = forward(variables, images, policy_a)
    logits_b = forward(variables, images, policy_b)
    np.testing.assert_array_equal(logits_a[0], logits_b[0])


def test_pieces_run_separately_match_the_forward_pass(tiny):
    """`embed`, `block`, `shortcut` and `head` are what a block-skipping inference path calls."""
    model, variables, images, forward = tiny
    policy = np.ones((BATCH, model.num_blocks), np.float32)
    policy[:, [3, 5]] = 0
    x = model.apply(variables, images, method="embed")
    for n in range(model.num_blocks):
        if policy[0, n]:
            x = model.apply(variables, x, 1.0, n, method="block")
        else:
            x = model.apply(variables, x, n, method="shortcut")
    logits = model.apply(variables, x, method="head")
    np.testing.assert_allclose(logits, forward(variables, images, policy), rtol=1e-5, atol=1e-5)


def test_training_mode_updates_batch_stats_and_eval_mode_does_not(tiny):
    model, variables, images, _ = tiny
    ones = jnp.ones((BATCH, model.num_blocks))
    apply = jax.jit(model.apply, static_argnames=("train", "mutable"))
    _, updates = apply(variables, images, ones, train=True, mutable=("batch_stats",))
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert len(before) == len(after)
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    _, unchanged = apply(variables, images, ones, train=False, mutable=("batch_stats",))
    jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])


def test_synced_batch_norm_over_devices_equals_batch_norm_of_the_global_batch(tiny):
    model, variables, _, _ = tiny
    mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    images = jax.random.uniform(jax.random.key(6), (8, 32, 32, 3))
    policy = (jax.random.uniform(jax.random.key(7), (8, model.num_blocks)) > 0.3).astype(
        jnp.float32
    )
    synced = model.clone(axis_name="data")

    @functools.partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P(), P("data"), P("data")),
        out_specs=(P("data"), P()),
    )
    def sharded(v, x, p):
        logits, updates = synced.apply(v, x, p, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]

    logits, stats = jax.jit(sharded)(variables, images, policy)
    global_batch = jax.jit(
        lambda v, x, p: model.apply(v, x, p, train=True, mutable=["batch_stats"])
    )
    expected_logits, expected = global_batch(variables, images, policy)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-4, atol=1e-4)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5),
        stats,
        expected["batch_stats"],
    )


# --- Policy network ----------------------------------------------------------------------------


def test_policy_network_parameters_at_paper_size():
    for use_geo in (True, False):
        model = PolicyNetwork(num_blocks=15, use_geo=use_geo)
        images = jax.ShapeDtypeStruct((2, 112, 112, 3), jnp.float32)
        locations = jax.ShapeDtypeStruct((2, 8), jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), images, locations)
        probs = jax.eval_shape(model.apply, variables, images, locations)
        assert probs.shape == (2, 15) and probs.dtype == jnp.float32
        assert ("loc_mlp" in variables["params"]) == use_geo
        expected = _policy_param_count(num_blocks=15, width=64, use_geo=use_geo)
        assert _count(variables["params"]) == expected


@pytest.fixture(scope="module")
def policy_inputs():
    images = jax.random.uniform(jax.random.key(8), (BATCH, 16, 16, 3))
    lat = np.array([48.858222, -33.856784, 40.689247, 35.658581])
    lon = np.array([2.2945, 151.215297, -74.044502, 139.745433])
    # Raw DMS 8-vectors written out here: sign, degrees, minutes, seconds for lat then lon.
    rows = []
    for value_pair in zip(lat, lon, strict=True):
        row = []
        for value in value_pair:
            a = abs(value)
            row += [np.sign(value), np.floor(a), np.floor(a * 60 % 60), a * 3600 % 60]
        rows.append(row)
    return images, jnp.asarray(np.array(rows, np.float32))


@functools.cache
def _policy(use_geo):
    """A tiny policy network (16 px photos, small stem, N = 9), random variables, jitted apply."""
    model = PolicyNetwork(num_blocks=9, use_geo=use_geo, width=8, stem="small")
    inputs = (jnp.zeros((BATCH, 16, 16, 3)), jnp.zeros((BATCH, 8)))
    variables = _random_variables(model, *inputs, seed=9)
    return model, variables, jax.jit(model.apply, static_argnames=("train", "mutable"))


def test_policy_probabilities_have_shape_b_n_and_lie_in_open_unit_interval(policy_inputs):
    images, locations = policy_inputs
    model, _, apply = _policy(True)
    # Flax's initialisation (one compile, with the cheaper 'rbg' generator): the untrained
    # network is centred on init_keep_prob = 0.75, so its greedy policy keeps the blocks.
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), images, locations)
    probs = apply(variables, images, locations)
    assert probs.shape == (BATCH, 9) and probs.dtype == jnp.float32
    assert np.all((probs > 0) & (probs < 1))
    assert 0.6 < float(probs.mean()) < 0.9


def test_policy_fuses_location_mlp_and_image_logits_with_alpha(policy_inputs):
    images, locations = policy_inputs
    model, variables, _ = _policy(True)
    capture = jax.jit(
        lambda v, x, loc: model.apply(
            v,
            x,
            loc,
            capture_intermediates=lambda m, _: m.name == "img_resnet10",
            mutable=["intermediates"],
        )
    )
    probs, state = capture(variables, images, locations)
    img_logits = state["intermediates"]["img_resnet10"]["__call__"][0]
    x = locations / LOCATION_SCALE  # Table 1's MLP on the scaled location, written out
    mlp = variables["params"]["loc_mlp"]
    for i in range(1, 6):
        x = x @ mlp[f"fc{i}"]["kernel"] + mlp[f"fc{i}"]["bias"]
        x = jax.nn.relu(x) if i < 5 else x
    expected = jax.nn.sigmoid(0.7 * x + 0.3 * img_logits)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)


def test_policy_without_geo_ignores_location(policy_inputs):
    images, locations = policy_inputs
    _, variables, apply = _policy(False)
    assert "loc_mlp" not in variables["params"]
    probs = apply(variables, images, locations)
    np.testing.assert_array_equal(probs, apply(variables, images, locations[::-1]))
    np.testing.assert_allclose(probs, apply(variables, images, None), rtol=1e-6)


def test_policy_with_geo_depends_on_location(policy_inputs):
    images, locations = policy_inputs
    _, variables, apply = _policy(True)
    probs = apply(variables, images, locations)
    moved = apply(variables, images, locations.at[:, 1].add(20.0))
    assert np.abs(np.asarray(probs - moved)).max() > 1e-4


def test_policy_training_mode_updates_batch_stats(policy_inputs):
    images, locations = policy_inputs
    _, variables, apply = _policy(True)
    _, updates = apply(variables, images, locations, train=True, mutable=("batch_stats",))
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(updates["batch_stats"])
    assert all(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


# --- Compact backbones (§4.4) ------------------------------------------------------------------
#
# Each compact conv is a dense conv with a structured kernel. The dense kernels are built here
# from the parameters, following each backbone's definition, and run through `_reference_logits`.

COMPACT = ("mobilenet", "shufflenet_g2", "shufflenet_g4", "hetconv_p2", "hetconv_p4")


def _block_diagonal(kernel, groups):
    """Grouped conv kernel (kh, kw, C_in/G, F) → dense (kh, kw, C_in, F): filters of group g
    (the g-th F/G outputs) see only input channels of group g."""
    kernel = np.asarray(kernel)
    kh, kw, c, f = kernel.shape
    dense = np.zeros((kh, kw, c * groups, f), np.float32)
    fg = f // groups
    for g in range(groups):
        dense[:, :, g * c : (g + 1) * c, g * fg : (g + 1) * fg] = kernel[
            :, :, :, g * fg : (g + 1) * fg
        ]
    return dense


def _mobilenet_kernels(p):
    depthwise = np.asarray(p["conv2"]["depthwise"]["kernel"])[:, :, 0, :]  # (3, 3, C)
    pointwise = np.asarray(p["conv2"]["pointwise"]["kernel"])[0, 0]  # (C, F)
    conv2 = np.einsum("hwi,io->hwio", depthwise, pointwise)
    return p["conv1"]["kernel"], conv2, p["conv3"]["kernel"]


def _shufflenet_kernels(groups):
    def kernels(p):
        depthwise = np.asarray(p["conv2"]["depthwise"]["kernel"])[:, :, 0, :]  # (3, 3, C)
        c = depthwise.shape[-1]
        conv2 = np.zeros((3, 3, c, c), np.float32)
        for k in range(c):
            # The shuffle puts input channel g·(C/G) + j at position j·G + g.
            source = (k % groups) * (c // groups) + k // groups
            conv2[:, :, source, k] = depthwise[:, :, k]
        conv1 = _block_diagonal(p["conv1"]["kernel"], groups)
        return conv1, conv2, _block_diagonal(p["conv3"]["kernel"], groups)

    return kernels


def _hetconv_kernels(parts):
    def kernels(p):
        conv2 = _block_diagonal(p["conv2"]["conv3x3"]["kernel"], parts)  # the 3×3 kernels
        pointwise = np.asarray(p["conv2"]["conv1x1"]["kernel"])[0, 0]  # ((P − 1)·C/P, F)
        c, f = conv2.shape[2] // parts, conv2.shape[3] // parts
        for g in range(parts):  # filter group
            for r in range(1, parts):  # its r-th other input group, (g + r) mod P
                h = (g + r) % parts
                rows = pointwise[(r - 1) * c : r * c, g * f : (g + 1) * f]
                conv2[1, 1, h * c : (h + 1) * c, g * f : (g + 1) * f] = rows  # 1×1: centre tap
        return p["conv1"]["kernel"], conv2, p["conv3"]["kernel"]

    return kernels


DENSE_KERNELS = {
    "mobilenet": _mobilenet_kernels,
    "shufflenet_g2": _shufflenet_kernels(2),
    "shufflenet_g4": _shufflenet_kernels(4),
    "hetconv_p2": _hetconv_kernels(2),
    "hetconv_p4": _hetconv_kernels(4),
}


def test_channel_shuffle_interleaves_the_groups():
    shuffled = channel_shuffle(jnp.arange(6.0)[None], 2)
    np.testing.assert_array_equal(shuffled[0], [0, 3, 1, 4, 2, 5])
    shuffled = channel_shuffle(jnp.arange(8.0), 4)
    np.testing.assert_array_equal(shuffled, [0, 2, 4, 6, 1, 3, 5, 7])


@pytest.mark.parametrize("conv_type", COMPACT)
def test_compact_backbone_parameters_at_paper_size(conv_type):
    model = Recognizer(depth=47, num_classes=420, width=64, stem="imagenet", conv_type=conv_type)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    policy = jax.ShapeDtypeStruct((2, 15), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, policy)
    logits = jax.eval_shape(model.apply, variables, images, policy)
    assert logits.shape == (2, 420)
    expected = _recognizer_param_count(
        blocks_per_stage=5, width=64, num_classes=420, conv_type=conv_type
    )
    assert _count(variables["params"]) == expected


@pytest.mark.parametrize("conv_type", COMPACT)
def test_compact_backbone_is_a_resnet_with_structured_kernels_and_drops_blocks(conv_type):
    model = Recognizer(**TINY, conv_type=conv_type)
    images = jax.random.uniform(jax.random.key(10), (BATCH, 32, 32, 3))
    # Per sample: all blocks; the first block of stage 2 dropped (its downsample stays); a
    # middle block dropped (identity); the first and the last block dropped.
    dropped_per_sample = [(), (3,), (4,), (0, 8)]
    policy = np.ones((BATCH, model.num_blocks), np.float32)
    for i, dropped in enumerate(dropped_per_sample):
        policy[i, list(dropped)] = 0
    variables = _random_variables(model, images, jnp.asarray(policy), seed=11)
    logits = jax.jit(model.apply)(variables, images, policy)
    for i, dropped in enumerate(dropped_per_sample):
        expected = _reference_logits(
            variables,
            images,
            stem="small",
            blocks_per_stage=3,
            dropped=set(dropped),
            dense_kernels=DENSE_KERNELS[conv_type],
        )
        np.testing.assert_allclose(logits[i], expected[i], rtol=1e-4, atol=1e-4)


def test_width_that_groups_do_not_divide_is_a_clear_error():
    model = Recognizer(depth=29, num_classes=5, width=6, stem="small", conv_type="shufflenet_g4")
    with pytest.raises(ValueError, match="multiple of 4"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1, 9)))


# --- M²Net+: the location conditions the recognizer ---------------------------------------------


def test_geo_conditioning_adds_a_location_embedding_before_the_classifier(policy_inputs):
    _, locations = policy_inputs
    images = jax.random.uniform(jax.random.key(12), (BATCH, 32, 32, 3))
    plain = Recognizer(**TINY)
    plus = Recognizer(**TINY, geo_conditioning=True)
    policy = np.ones((BATCH, 9), np.float32)
    policy[1, 3] = policy[2, [4, 7]] = 0
    variables = _random_variables(plus, images, jnp.ones((BATCH, 9)), seed=13, locations=locations)
    logits = jax.jit(plus.apply)(variables, images, policy, locations=locations)

    # The same network without the embedding, plus the embedding written out (Dense → ReLU →
    # Dense on the scaled location) through the classifier's weights.
    params = dict(variables["params"])
    embed = params.pop("geo_embedding")
    plain_vars = {"params": params, "batch_stats": variables["batch_stats"]}
    plain_forward = jax.jit(plain.apply)
    plain_logits = plain_forward(plain_vars, images, policy)
    hidden = jax.nn.relu(
        (locations / LOCATION_SCALE) @ embed["fc1"]["kernel"] + embed["fc1"]["bias"]
    )
    embedding = hidden @ embed["fc2"]["kernel"] + embed["fc2"]["bias"]
    expected = plain_logits + embedding @ params["classifier"]["kernel"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)

    # Without geo_conditioning the location is ignored.
    np.testing.assert_array_equal(
        plain_forward(plain_vars, images, policy, locations=locations), plain_logits
    )


def test_geo_conditioned_recognizer_needs_locations_and_starts_as_the_plain_one():
    plus = Recognizer(**TINY, geo_conditioning=True)
    images, policy = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 9))
    with pytest.raises(ValueError, match="geo_conditioning=True.*needs locations"):
        jax.eval_shape(plus.init, jax.random.key(0), images, policy)
    with pytest.raises(ValueError, match="needs locations"):
        jax.eval_shape(
            functools.partial(plus.init, locations=jnp.zeros((2, 2))),
            jax.random.key(0),
            images,
            policy,
        )
    # The embedding's last layer starts at zero: untrained, M²Net+ is the plain recognizer.
    fc2 = GeoEmbedding(16).init(jax.random.key(0), jnp.ones((1, 8)))["params"]["fc2"]
    np.testing.assert_array_equal(fc2["kernel"], 0)
    np.testing.assert_array_equal(fc2["bias"], 0)
