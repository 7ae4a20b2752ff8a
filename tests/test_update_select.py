"""update_scales picks each column's (layer x role) new or old history with a bitwise select
(fp8lab.scaling.update._where_columns_); it must equal torch.where bit for bit, NaN payloads and
infinities included, for every float dtype a model can be cast to."""

import pytest
import torch

from fp8lab.scaling.update import _where_columns_

INT_OF = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("h", [1, 7])
def test_bitwise_select_equals_where(dtype, h):
    gen = torch.Generator().manual_seed(0)
    n, itype = 5, INT_OF[torch.finfo(dtype).bits // 8]
    info = torch.iinfo(itype)
    # random bit patterns: many NaNs with payloads, infinities, subnormals, signed zeros
    new, old = (
        torch.randint(info.min, info.max, (h, n, 3), generator=gen, dtype=torch.int64).to(itype).view(dtype)
        for _ in range(2)
    )
    recorded = torch.rand(n, 3, generator=gen) > 0.5
    recorded[0], recorded[1] = True, False  # a whole layer each way
    expected = torch.where(recorded[None], new, old)
    old_before = old.clone()
    out = _where_columns_(recorded, new, old)
    assert out.data_ptr() == new.data_ptr()  # written in place into the temporary
    assert torch.equal(out.view(itype), expected.view(itype))
    assert torch.equal(old.view(itype), old_before.view(itype))
