import pytest
import torch

from saekit.sae.fast import SparseCode
from saekit.sae.fast.autograd import sparse_decode


def test_sparse_decode_equals_dense_product():
    torch.manual_seed(0)
    W = torch.randn(50, 8)
    z = torch.relu(torch.randn(6, 50) - 1.0)
    z[3] = 0  # a token with no active latent
    r, c = z.nonzero(as_tuple=True)
    code = SparseCode(r, c, z[r, c], z.shape)
    torch.testing.assert_close(sparse_decode(code, W), z @ W)
    torch.testing.assert_close(code.dense(), z)


# row-major entries (a selection's) and any order
@pytest.mark.parametrize("shuffled", [False, True])
def test_sparse_decode_gradients_equal_the_dense_products(shuffled):
    torch.manual_seed(0)
    z = torch.relu(torch.randn(7, 40) - 1.0)
    z[2] = 0  # a token with no active latent
    z[:, 5] = 0  # a latent that no token uses
    r, c = z.nonzero(as_tuple=True)
    if shuffled:
        perm = torch.randperm(r.numel())
        r, c = r[perm], c[perm]
    W1 = torch.randn(40, 8, requires_grad=True)
    W2 = W1.detach().clone().requires_grad_(True)
    vals = z[r, c].clone().requires_grad_(True)
    zd = z.clone().requires_grad_(True)
    g = torch.randn(7, 8)
    (sparse_decode(SparseCode(r, c, vals, z.shape), W1) * g).sum().backward()
    (zd @ W2 * g).sum().backward()
    torch.testing.assert_close(W1.grad, W2.grad)
    torch.testing.assert_close(vals.grad, zd.grad[r, c])


@pytest.mark.parametrize("input_grad,centred", [(False, False), (True, False), (False, True)])
def test_sparse_encode_gradients_equal_the_dense_products(input_grad, centred):
    """SparseEncode's gradients of W_enc, b_enc and b_dec (b_dec's as -W_enc times the column sums
    of the values' gradient) and, when the input asks for one, of the input, against autograd
    through the dense encode; also given x - b_dec made by the caller (differentiable to b_dec, as
    fast.paths.centred_pre_acts makes it): no gradient goes through it, so b_dec's is counted
    once."""
    from saekit.sae.fast.autograd import CodeIndex, sparse_encode

    torch.manual_seed(0)
    B, d, f = 9, 6, 30
    x = torch.randn(B, d, requires_grad=input_grad)
    W_enc, b_enc, b_dec = torch.randn(d, f), torch.randn(f), torch.randn(d)
    params = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, b_dec)]
    dense = [t.clone().requires_grad_(True) for t in (W_enc, b_enc, b_dec)]
    a = torch.relu((x.detach() - b_dec) @ W_enc + b_enc)
    r, c = (a > 1.0).nonzero(as_tuple=True)  # row-major entries, some rows without any
    g = torch.randn(r.numel())
    xc = x - params[2] if centred else None
    (
        sparse_encode(x, *params, CodeIndex(r, c, B, f, rows_sorted=True), a, xc).vals * g
    ).sum().backward()
    x_grad = x.grad.clone() if input_grad else None
    if input_grad:
        x.grad = None
    ad = torch.relu((x - dense[2]) @ dense[0] + dense[1])
    (ad[r, c] * g).sum().backward()
    for p1, p2, name in zip(params, dense, ("W_enc", "b_enc", "b_dec")):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)
    if input_grad:
        torch.testing.assert_close(x_grad, x.grad)


@pytest.mark.parametrize("rows_sorted", [True, False])
def test_code_index_counts_each_rows_entries(rows_sorted):
    """CodeIndex's row bounds: the offsets embedding_bag reads and, from the same search, each row's
    number of entries (a sparse path's l0 per token), rows without entries included; the shared
    aranges are arange's."""
    from saekit.sae.fast.index import CodeIndex, arange

    torch.manual_seed(0)
    rows = torch.tensor([0, 0, 2, 2, 2, 5, 6, 6])
    cols = torch.randint(0, 30, (8,))
    if not rows_sorted:
        perm = torch.randperm(8)
        rows, cols = rows[perm], cols[perm]
    index = CodeIndex(rows, cols, 8, 30, rows_sorted=rows_sorted)
    assert (
        index.row_counts().tolist()
        == torch.bincount(rows, minlength=8).tolist()
        == [2, 0, 3, 0, 0, 1, 2, 0]
    )
    assert index.row_offsets.tolist() == [0, 2, 2, 5, 5, 5, 6, 8]
    assert arange(9, rows.device) is arange(9, rows.device) and arange(
        9, rows.device
    ).tolist() == list(range(9))


def test_sparse_kernels_under_bf16_autocast_give_fp32_gradients():
    """Under autocast the encoder's values come from bf16 products; the sparse kernels' gradients
    still come back in the parameters' fp32, within bf16 rounding of the gradients of the same
    code in fp32."""
    from saekit.sae.fast.autograd import CodeIndex, sparse_encode

    torch.manual_seed(0)
    B, d, f = 16, 32, 96
    x = torch.randn(B, d)
    base = [
        torch.randn(d, f) * 0.3,
        torch.randn(f) * 0.1,
        torch.randn(d) * 0.1,
        torch.randn(f, d) * 0.3,
    ]
    # the same entries in both
    r, c = (torch.relu((x - base[2]) @ base[0] + base[1]) > 0.8).nonzero(as_tuple=True)
    grads = {}
    for low in (False, True):
        W_enc, b_enc, b_dec, W_dec = [t.clone().requires_grad_(True) for t in base]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            # bf16 under autocast
            a = torch.relu((x - b_dec.detach()) @ W_enc.detach() + b_enc.detach())
            code = sparse_encode(x, W_enc, b_enc, b_dec, CodeIndex(r, c, B, f, rows_sorted=True), a)
            out = sparse_decode(code, W_dec)
        (out.float() - x).pow(2).mean().backward()
        grads[low] = [t.grad for t in (W_enc, b_enc, b_dec, W_dec)] + [code.vals.detach()]
    # the values did come from bf16 products
    assert not torch.equal(grads[False][4], grads[True][4])
    for g32, g16, name in zip(grads[False], grads[True], ("W_enc", "b_enc", "b_dec", "W_dec")):
        assert g16.dtype == torch.float32, name
        assert (g16 - g32).norm() / g32.norm() < 0.02, name
