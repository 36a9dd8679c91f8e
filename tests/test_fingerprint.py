import torch

from implicit_negatives.fingerprint import text_encoder_fingerprint


def test_fingerprint_is_dtype_stable_and_sensitive_to_weights():
    table = torch.randn(1000, 768, generator=torch.Generator().manual_seed(0))
    base = text_encoder_fingerprint(table)
    assert text_encoder_fingerprint(table.half()) == base
    assert text_encoder_fingerprint(table.clone()) == base
    edited = table.clone()
    edited[97] += 0.01  # a sampled row
    assert text_encoder_fingerprint(edited) != base
    assert text_encoder_fingerprint(table[:999]) != base
