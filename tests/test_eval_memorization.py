import pytest
import torch

from pokediff.eval.memorization import memorization_metrics, nearest_neighbours


def test_nearest_neighbour_finds_copies_and_can_exclude_itself():
    torch.manual_seed(0)
    train = torch.randn(20, 8)
    sim, idx = nearest_neighbours(train[[3, 7]], train)
    assert torch.allclose(sim, torch.ones(2, dtype=torch.float64)) and idx.tolist() == [3, 7]
    sim, idx = nearest_neighbours(train, train, exclude_self=True)
    assert (idx != torch.arange(20)).all() and (sim < 1).all()
    with pytest.raises(ValueError, match="features must be"):
        nearest_neighbours(train, torch.randn(5, 4))


def test_copies_of_training_images_are_flagged_and_fresh_samples_are_not():
    torch.manual_seed(0)
    train, held_out = torch.randn(50, 16), torch.randn(10, 16)
    names = [f"{i:04d}.webp" for i in range(50)]
    copies = train[:8] + 1e-3 * torch.randn(8, 16)
    metrics, closest = memorization_metrics(copies, train, held_out, real_is_train=False, train_names=names)
    assert metrics["nn_train_similarity_max"] > 0.99 and metrics["nn_train_closer_than_real_max"] == 1.0
    assert closest[0]["train_file"] in names[:8] and closest[0]["similarity"] > 0.99
    fresh = torch.randn(8, 16)
    metrics, _ = memorization_metrics(fresh, train, held_out, real_is_train=False, train_names=names)
    assert metrics["nn_train_similarity_max"] < 0.99 and metrics["nn_train_closer_than_real_max"] < 1.0
    # the train protocol compares each training image with its nearest *other* training image
    metrics, _ = memorization_metrics(fresh, train, train, real_is_train=True, train_names=names)
    assert metrics["nn_train_similarity_real_max"] < 1.0
