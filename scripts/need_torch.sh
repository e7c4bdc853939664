#!/usr/bin/env bash
# need_torch.sh COMMAND... - runs COMMAND when /usr/bin/python3 can import torch; otherwise fails with
# a message saying what to install. The PyTorch tests are registered unconditionally and run through
# this, so no configure-time cache (a demo run before python3-torch was installed) can drop them.
if ! /usr/bin/python3 -c "import torch" >/dev/null 2>&1; then
  echo "FAILED: this test needs PyTorch under /usr/bin/python3, which cannot import torch." >&2
  echo "        Install it (Debian: apt-get install python3-torch, or: bash scripts/deps.sh test) and rerun." >&2
  exit 1
fi
exec "$@"
