"""Tests for m2net_jax.geo: the DMS location encoding of paper §3.1."""

import jax.numpy as jnp
import numpy as np
import pytest

from m2net_jax import geo

# Expected vectors written out by hand from D = floor(|x|), M = floor(60·frac), S = rest·60.
LANDMARKS = {
    # name: (lat, lon, [sign, D, M, S] lat + [sign, D, M, S] lon)
    "eiffel_tower": (48.858222, 2.2945, [1, 48, 51, 29.5992, 1, 2, 17, 40.2]),
    "sydney_opera_house": (-33.8568, 151.2153, [-1, 33, 51, 24.48, 1, 151, 12, 55.08]),
    "statue_of_liberty": (40.6892, -74.0445, [1, 40, 41, 21.12, -1, 74, 2, 40.2]),
    "christ_the_redeemer": (-22.9519, -43.2105, [-1, 22, 57, 6.84, -1, 43, 12, 37.8]),
}


@pytest.mark.parametrize("name", sorted(LANDMARKS))
def test_landmarks_in_all_four_hemispheres_encode_to_literal_dms(name):
    lat, lon, expected = LANDMARKS[name]
    encoded = geo.encode_location(lat, lon)
    assert encoded.shape == (8,)
    assert encoded.dtype == np.float32
    np.testing.assert_array_equal(
        encoded[[0, 1, 2, 4, 5, 6]], np.take(expected, [0, 1, 2, 4, 5, 6])
    )
    np.testing.assert_allclose(encoded[[3, 7]], np.take(expected, [3, 7]), atol=1e-4)


def test_round_trip_recovers_random_coordinates():
    rng = np.random.default_rng(0)
    lat = rng.uniform(-90, 90, size=5000)
    lon = rng.uniform(-180, 180, size=5000)
    decoded_lat, decoded_lon = geo.decode_location(geo.encode_location(lat, lon))
    assert decoded_lat.dtype == decoded_lon.dtype == np.float64
    np.testing.assert_allclose(decoded_lat, lat, rtol=0, atol=1e-6)
    np.testing.assert_allclose(decoded_lon, lon, rtol=0, atol=1e-6)


def test_dms_entries_are_whole_and_in_range_for_random_coordinates():
    rng = np.random.default_rng(1)
    encoded = geo.encode_location(rng.uniform(-90, 90, 5000), rng.uniform(-180, 180, 5000))
    signs, degrees = encoded[:, [0, 4]], encoded[:, [1, 5]]
    minutes, seconds = encoded[:, [2, 6]], encoded[:, [3, 7]]
    assert set(np.unique(signs)) <= {-1.0, 1.0}
    np.testing.assert_array_equal(degrees, np.floor(degrees))
    np.testing.assert_array_equal(minutes, np.floor(minutes))
    assert degrees.min() >= 0 and degrees[:, 0].max() <= 90 and degrees[:, 1].max() <= 180
    assert minutes.min() >= 0 and minutes.max() <= 59
    assert seconds.min() >= 0 and seconds.max() < 60


@pytest.mark.parametrize(
    "value, expected_dms",
    [
        # Just below a whole degree: must stay 10° 59' 59.9996", never 60 seconds.
        (10.9999999, [10, 59, 59.9996]),
        # Within rounding of a whole degree: carries all the way to 11° 0' 0".
        (10.99999999999, [11, 0, 0]),
        (-10.99999999999, [11, 0, 0]),
        # Within rounding of a whole minute (10° 30'): carries into the minutes.
        (10.5 - 1e-11, [10, 30, 0]),
        (89.999999999999, [90, 0, 0]),
        # Exactly representable minute boundaries.
        (0.25, [0, 15, 0]),
        (45.0, [45, 0, 0]),
    ],
)
def test_seconds_carry_into_minutes_and_degrees_without_reaching_60(value, expected_dms):
    encoded = geo.encode_location(value, value)
    for dms in (encoded[1:4], encoded[5:8]):
        np.testing.assert_allclose(dms, expected_dms, rtol=0, atol=1e-4)
        assert dms[1] < 60 and dms[2] < 60


def test_sign_is_plus_one_on_equator_and_prime_meridian_and_minus_one_south_west():
    encoded = geo.encode_location([0.0, -0.0, 1e-3, -1e-3], [0.0, -0.0, 1e-3, -1e-3])
    np.testing.assert_array_equal(encoded[:, 0], [1, 1, 1, -1])
    np.testing.assert_array_equal(encoded[:, 4], [1, 1, 1, -1])


def test_range_limits_are_accepted():
    encoded = geo.encode_location([90.0, -90.0], [180.0, -180.0])
    np.testing.assert_array_equal(encoded[0], [1, 90, 0, 0, 1, 180, 0, 0])
    np.testing.assert_array_equal(encoded[1], [-1, 90, 0, 0, -1, 180, 0, 0])


@pytest.mark.parametrize(
    "lat, lon, message",
    [
        (91.0, 0.0, r"Latitude 91\.0 is outside \[-90, 90\]"),
        (0.0, -181.0, r"Longitude -181\.0 is outside \[-180, 180\]"),
        (np.nan, 0.0, r"Latitude nan is NaN or infinite"),
        (0.0, np.inf, r"Longitude inf is NaN or infinite"),
        ([0.0, 10.0, -95.0, 92.0], 0.0, r"Latitude -95\.0 at index \(2,\).*2 of 4"),
    ],
)
def test_invalid_coordinates_raise_value_error_naming_the_value(lat, lon, message):
    with pytest.raises(ValueError, match=message):
        geo.encode_location(lat, lon)


def test_encoding_broadcasts_lat_and_lon_shapes():
    lat = np.array([10.0, 20.0, 30.0])
    lon = np.array([[-5.0], [5.0]])
    encoded = geo.encode_location(lat, lon)
    assert encoded.shape == (2, 3, 8)
    np.testing.assert_array_equal(encoded[1, 2], geo.encode_location(30.0, 5.0))
    assert geo.encode_location(np.zeros((4, 2)), 1.0).shape == (4, 2, 8)
    assert geo.encode_location([], []).shape == (0, 8)


def test_decode_rejects_wrong_last_dimension():
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        geo.decode_location(np.zeros((3, 7)))


def test_scale_location_divides_by_entry_ranges_for_numpy_and_jax():
    encoded = geo.encode_location([-90.0, 48.858222], [-180.0, 2.2945])
    expected = encoded / np.array([1, 90, 60, 60, 1, 180, 60, 60], np.float32)
    np.testing.assert_allclose(geo.scale_location(encoded), expected, rtol=1e-6)
    scaled_jax = geo.scale_location(jnp.asarray(encoded))
    assert isinstance(scaled_jax, jnp.ndarray)
    np.testing.assert_allclose(np.asarray(scaled_jax), expected, rtol=1e-6)
    assert np.abs(expected).max() <= 1.0
