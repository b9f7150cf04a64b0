"""Masks: equality in one place (the incumbent, the job and the tests all use it)."""
import torch

from bpp.masks import Masks


def _masks(S=2, L=3, m=5, G=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Masks(torch.rand(S, L, m, generator=g) < 0.5, torch.rand(S, L, G, generator=g) < 0.5,
                 torch.rand(S, L, generator=g) < 0.5)


def test_equal_masks_compare_equal_and_one_flipped_unit_does_not():
    a, b = _masks(), _masks()
    assert a == b and not (a != b)
    b.channels[1, 2, 4] = ~b.channels[1, 2, 4]
    assert a != b
    c = _masks()
    c.layers[0, 0] = ~c.layers[0, 0]
    assert a != c


def test_masks_of_other_shapes_or_types_are_not_equal():
    assert _masks() != _masks(S=1)
    assert _masks() != _masks(m=6)
    assert _masks() != "a mask"
    assert (_masks() == object()) is False
