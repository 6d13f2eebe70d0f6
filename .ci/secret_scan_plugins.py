"""detect-secrets detectors for credentials that only SHERS issues (loaded by .ci/secret-scan)."""
import re

from detect_secrets.plugins.base import RegexBasedDetector


class ShersTokenDetector(RegexBasedDetector):
    """SHERS API tokens: `shers_` followed by 64 lowercase hex digits (src/domain/auth.rs)."""

    secret_type = 'SHERS API Token'  # pragma: allowlist secret (a detector's name)

    denylist = (re.compile(r'\bshers_[0-9a-f]{64}\b'),)
