"""Location encoding: decimal GPS coordinates as Degrees-Minutes-Seconds 8-vectors (paper §3.1).

The paper encodes a photo's location in the D°M'S" format, "replacing N and S or E and W with ±1
as flags", giving the 8-vector

    [sign_lat, deg_lat, min_lat, sec_lat, sign_lon, deg_lon, min_lon, sec_lon]

e.g. the Eiffel Tower, 48.858222 N 2.2945 E, is ``[1, 48, 51, 29.5992, 1, 2, 17, 40.2]``. Degrees,
minutes and seconds are non-negative; the hemisphere lives only in the sign flag. The vector is
stored raw (the paper's definition, and what the datasets hold); the location MLP of the policy
network brings the entries to about [-1, 1] with `scale_location`.

This is host-side numpy: it runs while datasets are built and photos are loaded, never inside a
jitted step (`scale_location` is the exception, and works on jax arrays too).
"""

import numpy as np

# Seconds are kept to 1e-4 arc-seconds (about 3 mm on the ground, far below GPS error). The
# D/M/S split is done in integers of that unit, so a carry can never produce 60 seconds or
# 60 minutes, and the float32 output cannot round 59.9999 up to 60 (float32's spacing near 60
# is 4e-6).
_UNITS_PER_ARCSEC = 10_000
_UNITS_PER_ARCMIN = 60 * _UNITS_PER_ARCSEC
_UNITS_PER_DEGREE = 60 * _UNITS_PER_ARCMIN

# Divisors that bring each raw entry to about [-1, 1]: sign 1, degrees by their range
# (90 for latitude, 180 for longitude), minutes and seconds by 60.
LOCATION_SCALE = np.array([1.0, 90.0, 60.0, 60.0, 1.0, 180.0, 60.0, 60.0], dtype=np.float32)


def _check_coordinate(values: np.ndarray, *, name: str, limit: float) -> None:
    """Raises ValueError naming the first entry of `values` that is not finite or out of range."""
    bad_kinds = (
        (~np.isfinite(values), "is NaN or infinite"),
        (np.abs(values) > limit, f"is outside [-{limit:g}, {limit:g}]"),
    )
    for bad, what in bad_kinds:
        if np.any(bad):
            count = int(np.count_nonzero(bad))
            first = np.unravel_index(int(np.argmax(bad)), values.shape) if values.ndim else ()
            index = f" at index {tuple(int(i) for i in first)}" if values.ndim else ""
            raise ValueError(
                f"{name} {float(values[first])!r}{index} {what} "
                f"({count} of {values.size} values bad)."
            )


def _dms(values: np.ndarray) -> np.ndarray:
    """(...,) decimal degrees (already validated) -> (..., 4) float64 [sign, deg, min, sec]."""
    # -0.0 >= 0 is True, so the equator and the prime meridian get the +1 (N/E) flag.
    sign = np.where(values >= 0, 1.0, -1.0)
    units = np.rint(np.abs(values) * _UNITS_PER_DEGREE).astype(np.int64)
    degrees, units = np.divmod(units, _UNITS_PER_DEGREE)
    minutes, units = np.divmod(units, _UNITS_PER_ARCMIN)
    seconds = units / _UNITS_PER_ARCSEC
    return np.stack([sign, degrees.astype(np.float64), minutes.astype(np.float64), seconds], -1)


def encode_location(lat, lon) -> np.ndarray:
    """Encodes decimal latitude/longitude as the paper's DMS 8-vector (§3.1, Fig. 3a).

    Args:
      lat: latitude in decimal degrees, north positive; a scalar or array in [-90, 90].
      lon: longitude in decimal degrees, east positive; a scalar or array in [-180, 180],
        broadcastable against `lat`.

    Returns:
      (..., 8) float32 ``[sign_lat, deg_lat, min_lat, sec_lat, sign_lon, deg_lon, min_lon,
      sec_lon]`` with ``...`` the broadcast shape of `lat` and `lon` (``(8,)`` for scalars).
      Signs are +1 (N/E, and exactly 0) or -1 (S/W); degrees and minutes are whole numbers;
      seconds are in [0, 60) to 1e-4 arc-second.

    Raises:
      ValueError: a coordinate is NaN or infinite, |lat| > 90 or |lon| > 180; the message names
        the first offending value, its index and how many are bad.
    """
    lat, lon = np.broadcast_arrays(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    _check_coordinate(lat, name="Latitude", limit=90.0)
    _check_coordinate(lon, name="Longitude", limit=180.0)
    return np.concatenate([_dms(lat), _dms(lon)], axis=-1).astype(np.float32)


def decode_location(encoded) -> tuple[np.ndarray, np.ndarray]:
    """Inverts `encode_location`: (..., 8) DMS vectors -> (lat, lon) decimal degrees.

    Args:
      encoded: (..., 8) array as returned by `encode_location`.

    Returns:
      (lat, lon), each (...,) float64 decimal degrees (north/east positive).
    """
    encoded = np.asarray(encoded, np.float64)
    if encoded.shape[-1:] != (8,):
        raise ValueError(f"Expected location vectors of shape (..., 8), got {encoded.shape}.")
    sign, degrees, minutes, seconds = np.moveaxis(encoded.reshape(*encoded.shape[:-1], 2, 4), -1, 0)
    decimal = sign * (degrees + minutes / 60.0 + seconds / 3600.0)
    return decimal[..., 0], decimal[..., 1]


def scale_location(encoded):
    """Scales raw DMS 8-vectors entry-wise to about [-1, 1] for the location MLP (§3.1).

    The paper notes that degrees, minutes and seconds "have different scales"; dividing by each
    entry's range keeps the MLP's first layer well conditioned.

    Args:
      encoded: (..., 8) numpy or jax array of raw location vectors.

    Returns:
      Same shape and array type: signs unchanged, degrees / 90 (lat) or / 180 (lon), minutes and
      seconds / 60.
    """
    return encoded / LOCATION_SCALE
