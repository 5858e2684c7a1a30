"""Per-photo prediction: the masked model's answer, the policy's FLOPs, validated inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from random_variables import random_variables

from m2net_jax import flops, geo
from m2net_jax.inference import Predictor
from m2net_jax.models import PolicyNetwork, Recognizer

S = 32
N = 9
K = 5
EIFFEL = (48.858222, 2.2945)


@pytest.fixture(scope="module")
def predictor():
    rec = Recognizer(depth=29, num_classes=K, width=8, stem="small")
    pol = PolicyNetwork(num_blocks=N, width=8, stem="small")
    v_rec = random_variables(rec, jnp.zeros((1, S, S, 3)), jnp.ones((1, N)), seed=1, bias_std=0.3)
    v_pol = random_variables(
        pol, jnp.zeros((1, S // 2, S // 2, 3)), jnp.zeros((1, 8)), seed=2, bias_std=0.3
    )
    variables = {c: {"recognizer": v_rec[c], "policy": v_pol[c]} for c in ("params", "batch_stats")}
    names = [f"class{i}" for i in range(K)]
    return Predictor(rec, pol, variables, image_size=S, class_names=names)


def photo(seed=0, shape=(S, S, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reference(predictor, image_01, location):
    """The definition, written out: policy network on the 2×2-averaged photo and the location,
    greedy policy s ≥ 0.5, masked recognizer (every block computed, dropped ones blended out)."""
    v = predictor.variables
    half = image_01.reshape(S // 2, 2, S // 2, 2, 3).mean(axis=(1, 3))
    s = jax.jit(predictor.policy_network.apply)(
        {"params": v["params"]["policy"], "batch_stats": v["batch_stats"]["policy"]},
        half[None],
        location[None],
    )[0]
    policy = np.asarray(s) >= 0.5
    logits = jax.jit(predictor.recognizer.apply)(
        {"params": v["params"]["recognizer"], "batch_stats": v["batch_stats"]["recognizer"]},
        image_01[None],
        policy[None].astype(np.float32),
    )[0]
    return np.asarray(jax.nn.softmax(logits)), policy, np.asarray(s)


def test_prediction_is_the_masked_models_answer_with_the_policys_flops(predictor):
    image = photo()
    result = predictor.predict(image, *EIFFEL)
    probs, policy, s = reference(
        predictor, image.astype(np.float32) / 255.0, geo.encode_location(*EIFFEL)
    )
    assert 0 < policy.sum() < N  # A mixed policy: some blocks really are skipped.
    np.testing.assert_array_equal(result.policy, policy)
    np.testing.assert_allclose(result.keep_probabilities, s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.probabilities, probs, rtol=1e-4, atol=1e-6)
    assert result.label == int(np.argmax(probs))
    assert result.class_name == f"class{result.label}"
    assert result.blocks == policy.sum()
    parts = flops.recognizer_flops(depth=29, num_classes=K, width=8, image_size=S, stem="small")
    ran = parts.stem + parts.downsamples.sum() + parts.classifier + parts.blocks[policy].sum()
    policy_net = flops.policy_network_flops(num_blocks=N, image_size=S // 2, width=8, stem="small")
    assert result.recognizer_flops == ran
    assert result.flops == ran + policy_net
    assert result.full_flops == parts.stem + parts.downsamples.sum() + parts.classifier + sum(
        parts.blocks
    )
    assert result.recognizer_flops < result.full_flops


def test_uint8_and_float_photos_and_the_location_vector_agree(predictor):
    image = photo(1)
    a = predictor.predict(image, latitude=EIFFEL[0], longitude=EIFFEL[1])
    b = predictor.predict(image.astype(np.float64) / 255.0, location=geo.encode_location(*EIFFEL))
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a.policy, b.policy)


def test_photo_of_another_size_is_centre_cropped_and_resized(predictor):
    image = photo(2, shape=(48, 64, 3))
    # Independently: the centred 48×48 square, resampled bilinearly to S×S (as evaluation does).
    square = Image.fromarray(image).resize((S, S), Image.Resampling.BILINEAR, box=(8, 0, 56, 48))
    square = np.asarray(square)
    a = predictor.predict(image, *EIFFEL)
    b = predictor.predict(square, *EIFFEL)
    np.testing.assert_allclose(a.probabilities, b.probabilities, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "image, kwargs, match",
    [
        (photo()[..., 0], dict(latitude=1.0, longitude=2.0), r"expected one RGB photo \(H, W, 3\)"),
        (photo(shape=(S, S, 4)), dict(latitude=1.0, longitude=2.0), "RGB"),
        (photo()[None], dict(latitude=1.0, longitude=2.0), "shape"),
        (photo().astype(np.float32), dict(latitude=1.0, longitude=2.0), r"expected \[0, 1\]"),
        (photo().astype(np.int32), dict(latitude=1.0, longitude=2.0), "dtype int32"),
        (np.full((S, S, 3), np.nan), dict(latitude=1.0, longitude=2.0), "NaN"),
        (photo(), dict(latitude=91.0, longitude=2.0), "Latitude 91"),
        (photo(), dict(latitude=1.0, longitude=-200.0), "Longitude -200"),
        (photo(), dict(latitude=float("nan"), longitude=2.0), "NaN"),
        (photo(), dict(latitude=1.0), "Both latitude and longitude"),
        (photo(), dict(), "reads the photo's location"),
        (photo(), dict(latitude=1.0, longitude=2.0, location=np.zeros(8)), "not both"),
        (photo(), dict(location=np.zeros(7)), r"shape \(7,\)"),
        (photo(), dict(location=[1, 48, 75, 0, 1, 2, 17, 40]), "minutes"),
        (photo(), dict(location=[0, 48, 51, 0, 1, 2, 17, 40]), "hemisphere"),
        (photo(), dict(location=[1, 95, 0, 0, 1, 2, 17, 40]), "Latitude 95"),
        (photo(), dict(latitude=[1.0, 2.0], longitude=[2.0, 3.0]), "scalars"),
    ],
)
def test_malformed_inputs_are_clear_errors(predictor, image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictor.predict(image, **kwargs)


def test_predictor_needs_both_networks_variables(predictor):
    v = predictor.variables
    only_recognizer = {c: {"recognizer": v[c]["recognizer"]} for c in v}
    with pytest.raises(ValueError, match="lacks"):
        Predictor(predictor.recognizer, predictor.policy_network, only_recognizer, image_size=S)


def test_from_workdir_names_the_missing_checkpoint_and_the_stage_it_needs(smoke_data_dir, tmp_path):
    from m2net_jax.configs import r47

    config = r47.get_config("smoke")
    config.data.data_dir = smoke_data_dir
    with pytest.raises(FileNotFoundError, match="No 'finetune' checkpoint"):
        Predictor.from_workdir(config, str(tmp_path))
    with pytest.raises(ValueError, match="no policy network"):
        Predictor.from_workdir(config, str(tmp_path), stage="pretrain")
