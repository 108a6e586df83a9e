# Sourced by scripts/quickstart, scripts/test and .ci/run: installs what is missing on a
# Debian/Ubuntu machine (as root, or with sudo), and says what to install elsewhere.

setup_say() { printf 'setup: %s\n' "$*" >&2; }

# Runs apt-get as root, or via sudo; returns 1 when neither is possible.
setup_apt() {
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || return 1
    sudo="sudo"
  fi
  if [ -z "${SETUP_APT_UPDATED:-}" ]; then
    $sudo apt-get update -qq >&2 || return 1
    SETUP_APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >&2
}

setup_missing_debs() {
  local pkg missing=()
  command -v dpkg-query >/dev/null 2>&1 || return 0
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  echo "${missing[@]:-}"
}

# Elixir >= 1.14 / OTP >= 25, and what the NIF build needs (C toolchain, OpenSSL headers).
setup_build_tools() {
  local missing
  missing=$(setup_missing_debs elixir erlang-dev erlang-nox build-essential libssl-dev zlib1g-dev pkg-config)
  if ! command -v mix >/dev/null 2>&1 || [ -n "$missing" ]; then
    if [ -n "$missing" ] && setup_apt $missing; then
      setup_say "installed $missing"
    elif ! command -v mix >/dev/null 2>&1; then
      setup_say "Elixir >= 1.14 with Erlang/OTP >= 25 is needed (Debian: apt-get install elixir erlang-dev erlang-nox)"
      return 1
    fi
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  if ! command -v cargo >/dev/null 2>&1; then
    setup_say "Rust >= 1.91 with cargo is needed to build the NIF (install it with rustup)"
    return 1
  fi
}

# Java 17 and Maven, for the real Kafka broker the tests use.
setup_broker_tools() {
  if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    if setup_apt openjdk-17-jre-headless maven; then
      setup_say "installed Java 17 and Maven"
    else
      setup_say "Java 17 and Maven are needed for the test broker (Debian: apt-get install openjdk-17-jre-headless maven)"
      return 1
    fi
  fi
}

# openssl, with which scripts/kafka makes the secure test broker's CA, certificates and keys.
setup_secure_tools() {
  command -v openssl >/dev/null 2>&1 && return 0
  if setup_apt openssl; then
    setup_say "installed openssl"
  else
    setup_say "openssl is needed for the secure test broker (Debian: apt-get install openssl)"
    return 1
  fi
}
