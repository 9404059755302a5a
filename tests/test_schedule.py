"""The GPU-built schedule vs reference.build_schedule: integer metadata compared exactly."""
import pytest
import torch

import tritonmoe
from tritonmoe import reference
from tritonmoe.schedule import max_blocks
from conftest import random_topk_ids
from helpers import EK, TOKENS


def expected_block_map(counts, offsets, block_m, absorb_m=0, busy_first=False):
    experts, rows, ranks, siblings = [], [], [], []
    blocks = []
    for c in counts.tolist():
        n = -(-c // block_m)
        if c > block_m and 0 < c % block_m <= absorb_m:
            n -= 1  # the last whole block takes the rest
        blocks.append(n)
    order = list(range(len(blocks)))
    if busy_first:  # experts with more than one block, then those with one, each part in id order
        order = [e for e in order if blocks[e] > 1] + [e for e in order if blocks[e] <= 1]
    for e in order:
        n = blocks[e]
        for b in range(n):
            experts.append(e)
            rows.append(int(offsets[e]) + b * block_m)
            ranks.append(b)
            siblings.append(n)
    return experts, rows, ranks, siblings


def check_schedule(ids, E, block_m, absorb_m=0, busy_first=False):
    T, k = ids.shape
    s = tritonmoe.build_schedule(ids, E, block_m, absorb_m, busy_first)
    counts, offsets, sorted_slots, positions = reference.build_schedule(ids.cpu(), E)
    assert s.max_blocks == max_blocks(T * k, E, block_m)
    for name in ("expert_counts", "expert_offsets", "sorted_slots", "slot_positions", "block_expert",
                 "block_row_start", "block_rank", "block_siblings", "num_blocks", "num_busy_blocks", "num_invalid"):
        assert getattr(s, name).dtype == torch.int32, name
    assert torch.equal(s.expert_counts.cpu().long(), counts)
    assert torch.equal(s.expert_offsets.cpu().long()[: E + 1], offsets)
    assert int(s.expert_offsets[E + 1]) == T * k and int(s.num_invalid) == 0
    assert torch.equal(s.sorted_slots.cpu().long(), sorted_slots)
    assert torch.equal(s.slot_positions.cpu().long(), positions)
    experts, rows, ranks, siblings = expected_block_map(counts, offsets, block_m, absorb_m, busy_first)
    n, unused = len(experts), s.max_blocks - len(experts)
    assert int(s.num_blocks) == n <= s.max_blocks
    assert int(s.num_busy_blocks) == sum(1 for b in siblings if b > 1)
    assert s.block_expert.cpu().tolist() == experts + [-1] * unused
    assert s.block_row_start.cpu()[:n].tolist() == rows
    # unused blocks are groups of their own (rank 0 of 1), so the GEMMs' programs for them exit
    assert s.block_rank.cpu().tolist() == ranks + [0] * unused
    assert s.block_siblings.cpu().tolist() == siblings + [1] * unused
    return s


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("T", TOKENS)
@pytest.mark.parametrize("E,k", EK)
def test_schedule_random(E, k, T, block_m, device, poison):
    g = torch.Generator().manual_seed(E * 7 + k * 3 + T)
    check_schedule(random_topk_ids(T, k, E, device, g), E, block_m)


@pytest.mark.parametrize("T", [1, 300, 2500])
def test_schedule_all_on_one_expert(T, device, poison):
    # every slot on expert 5 (k = 1): one expert, many blocks; 2500 slots span several chunks
    ids = torch.full((T, 1), 5, dtype=torch.int32, device=device)
    check_schedule(ids, 8, 16)


def test_schedule_one_token_per_expert(device, poison):
    ids = torch.arange(256, dtype=torch.int32, device=device).flip(0).view(256, 1)
    s = check_schedule(ids, 256, 16)
    assert int(s.num_blocks) == 256


def test_schedule_most_experts_empty(device, poison):
    # E = 256, only experts 3, 200 and 255 used, 2 choices per token over 1200 tokens (3 chunks)
    g = torch.Generator().manual_seed(1)
    pick = torch.tensor([3, 200, 255])
    first = torch.randint(0, 3, (1200,), generator=g)
    ids = torch.stack([pick[first], pick[(first + 1) % 3]], 1).to(torch.int32).to(device)
    check_schedule(ids, 256, 32)


@pytest.mark.parametrize("absorb_m", [0, 32])
def test_schedule_many_chunks_many_experts(absorb_m, device, poison):
    # E = 256 (512 bins): the scan takes its chunks 16 at a time and 18 chunks need two steps; the hot
    # expert's 20+ blocks need two steps of the block map (16 ranks of every expert per step)
    g = torch.Generator().manual_seed(2)
    ids = random_topk_ids(2200, 2, 256, device, g)
    ids[::4, 0] = 7  # a hot expert: 550 of 4400 slots
    ids[::4, 1] = torch.where(ids[::4, 1] == 7, 8, ids[::4, 1])  # a token's choices stay distinct
    check_schedule(ids, 256, 16 if absorb_m == 0 else 64, absorb_m)


@pytest.mark.parametrize("absorb_m", [0, 32])
@pytest.mark.parametrize("many", [False, True], ids=["one-launch", "chunks"])
def test_schedule_busy_first(many, absorb_m, device, poison):
    # experts with several blocks laid out before those with one (empty experts: none), each in id order;
    # with absorb_m an expert a few rows past one block has one; with `many`, over 512 slots (three launches)
    counts = [3, 200, 0, 64, 65, 130, 1, 96, 64 + absorb_m] + ([600, 7, 129, 40] if many else [])
    g = torch.Generator().manual_seed(5 + absorb_m)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = ids[torch.randperm(len(ids), generator=g)].view(-1, 1).to(torch.int32).to(device)
    s = check_schedule(ids, len(counts), 64, absorb_m, busy_first=True)
    assert s.busy_first
    siblings = s.block_siblings[: int(s.num_blocks)].tolist()
    assert 1 in siblings and siblings == sorted(siblings, key=lambda n: n == 1)  # a real reordering was checked
    assert s.block_expert.tolist()[:2] == [1, 1]  # expert 1's 200 rows: four blocks, first


@pytest.mark.parametrize("absorb_m", [16, 32])
@pytest.mark.parametrize("many", [False, True], ids=["one-launch", "chunks"])
def test_schedule_absorbs_tails(many, absorb_m, device, poison):
    # counts just under, at and past a whole 64-row block, by up to absorb_m rows and by one more; with
    # `many`, also past two blocks and more than 512 slots (the three-launch schedule)
    counts = [1, 17, 63, 64, 65, 64 + absorb_m, 65 + absorb_m, 0] + ([128, 128 + absorb_m, 200, 300] if many else [])
    g = torch.Generator().manual_seed(absorb_m)
    ids = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    ids = ids[torch.randperm(len(ids), generator=g)].view(-1, 1).to(torch.int32).to(device)
    s = check_schedule(ids, len(counts), 64, absorb_m)
    full = check_schedule(ids, len(counts), 64)
    assert int(s.num_blocks) == int(full.num_blocks) - (4 if many else 2)  # 65, 64 + absorb_m (and 128 + absorb_m, 200)


def test_schedule_absorb_m_checked(device):
    ids = torch.zeros(4, 1, dtype=torch.int32, device=device)
    for bad in (8, 24, 64, 128):
        with pytest.raises(ValueError, match="absorb_m must be 0 or a power of two in"):
            tritonmoe.build_schedule(ids, 4, 64, bad)


def test_schedule_counts_sum_to_slots(device):
    g = torch.Generator().manual_seed(2)
    s = tritonmoe.build_schedule(random_topk_ids(77, 8, 64, device, g), 64, 16)
    assert int(s.expert_counts.sum()) == 77 * 8
    assert torch.equal(s.sorted_slots[s.slot_positions.long()].cpu(), torch.arange(77 * 8, dtype=torch.int32))


@pytest.mark.parametrize("T", [5, 200])  # one launch / three
def test_schedule_int64_ids(T, device, poison):
    g = torch.Generator().manual_seed(T)
    check_schedule(random_topk_ids(T, 4, 16, device, g).long(), 16, 16)
