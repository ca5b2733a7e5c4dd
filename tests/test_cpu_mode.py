"""CPU mode's runtime patches: every target still exists and is the code the patch was written
against. A failure here means megatron-core (or torch) changed under a patch: review the patch,
then update its fingerprint."""

import pytest

from megatron_mxn.cpu import PATCHES
from megatron_mxn.patching import resolve, source_fingerprint


@pytest.mark.parametrize("patch", PATCHES, ids=[p.target for p in PATCHES])
def test_patch_target_is_unchanged(patch):
    try:
        target = resolve(patch.target)
    except (ImportError, AttributeError) as err:
        pytest.fail(f"CPU-mode patch target {patch.target} is gone ({err}); the patch was "
                    f"written for {patch.versions}")
    if patch.fingerprint is not None:
        assert source_fingerprint(target) == patch.fingerprint, (
            f"{patch.target} changed since its CPU-mode patch was written for {patch.versions}: "
            f"review the patch ({patch.reason}) and update its fingerprint")


def test_every_patch_documents_versions_and_reason():
    for p in PATCHES:
        assert p.versions and len(p.reason) > 20, p.target
        if p.target.startswith("megatron."):
            assert p.fingerprint, f"{p.target}: megatron targets carry a source fingerprint"
