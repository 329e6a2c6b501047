#!/usr/bin/env bash
# Installs scripts/pre_commit.sh as the repository's git pre-commit hook.
set -euo pipefail
cd "$(dirname "$0")/.."
hooks="$(git rev-parse --git-path hooks)"
mkdir -p "$hooks"
cat >"$hooks/pre-commit" <<'HOOK'
#!/usr/bin/env bash
# Installed by scripts/install_hooks.sh. Skip once with `git commit --no-verify`.
exec "$(git rev-parse --show-toplevel)/scripts/pre_commit.sh"
HOOK
chmod +x "$hooks/pre-commit"
echo "installed $hooks/pre-commit"
