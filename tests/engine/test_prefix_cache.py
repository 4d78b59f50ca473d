import torch

from tutorial_api.engine.prefix_cache import PrefixCache


def states(tokens, layers=2):
    """A sequence's stand-in keys and values: each position holds its own token, so a slice shows
    whose it is.
    """
    held = torch.tensor(tokens, dtype=torch.float32)[None, None, :, None].expand(
        1, 2, len(tokens), 4
    )
    return [(held.clone(), held.clone() + layer) for layer in range(layers)]


def size(tokens):
    return sum(keys.nbytes + values.nbytes for keys, values in states(tokens))


def test_the_longest_cached_start_is_found():
    """The longest cached start is found, but never the whole prompt."""
    cache = PrefixCache(2**20)
    cache.store((1, 2, 3, 4), states([1, 2, 3, 4]))
    cache.store((1, 2, 7), states([1, 2, 7]))
    assert cache.longest([1, 2, 3, 9, 9])[0] == 3
    length, found = cache.longest([1, 2, 7, 8])
    assert length == 3 and found[1][1][0, 0, :length, 0].tolist() == [
        2,
        3,
        8,
    ]  # the (1, 2, 7) entry's, layer 1
    assert cache.longest([1, 2, 3, 4])[0] == 3  # its last token must still be computed
    assert cache.longest([5, 1, 2]) == (0, None)
    assert cache.longest([1]) == (0, None)


def test_a_repeated_start_of_another_is_kept_once():
    """A sequence that repeats the start of another is kept once."""
    cache = PrefixCache(2**20)
    cache.store((1, 2), states([1, 2]))
    cache.store((1, 2, 3), states([1, 2, 3]))  # a chat's next turn replaces its last
    assert cache.bytes == size([1, 2, 3])
    cache.store((1, 2), states([1, 2]))
    assert cache.bytes == size([1, 2, 3])
    assert cache.longest([1, 2, 3, 4])[0] == 3


def test_the_least_recently_used_go_first():
    """The least recently used go first, to stay within the budget."""
    cache = PrefixCache(2 * size([1, 2, 3]))
    cache.store((1, 2, 3), states([1, 2, 3]))
    cache.store((4, 5, 6), states([4, 5, 6]))
    cache.longest([1, 2, 3, 0])
    cache.store((7, 8, 9), states([7, 8, 9]))
    assert cache.longest([4, 5, 6, 0]) == (0, None)
    assert cache.longest([1, 2, 3, 0])[0] == cache.longest([7, 8, 9, 0])[0] == 3
    assert cache.bytes == 2 * size([1, 2, 3])


def test_a_cache_without_room_keeps_nothing():
    cache = PrefixCache(0)
    cache.store((1, 2, 3), states([1, 2, 3]))
    assert cache.bytes == 0 and cache.longest([1, 2, 3, 4]) == (0, None)


def test_each_scope_finds_and_replaces_only_its_own_entries():
    """A scope finds only its own entries, and storing a longer one replaces only its own."""
    cache = PrefixCache(2**20)
    cache.store((1, 2, 3), states([1, 2, 3]), "alice")
    assert cache.longest([1, 2, 3, 4], "alice")[0] == 3
    assert cache.longest([1, 2, 3, 4], "bob") == (0, None)
    assert cache.longest([1, 2, 3, 4]) == (0, None)  # no key: the shared entries only
    cache.store((1, 2, 3, 4), states([1, 2, 3, 4]), "bob")
    assert cache.longest([1, 2, 3, 9], "alice")[0] == 3
    assert cache.bytes == size([1, 2, 3]) + size([1, 2, 3, 4])
