defmodule Mix.Tasks.Compile.OttlaNif do
  @shortdoc "Builds the Rust NIF with cargo and installs it into priv/native"
  @moduledoc """
  Builds `native/ottla_nif` with `cargo build --release` and installs the library as
  `priv/native/libottla_nif.so`.

  It is defined here, in `mix.exs`, because Mix must find it before `lib/` is compiled.
  cargo decides what to rebuild, so a run with no Rust change costs well under a second.
  The library is installed by copy-then-rename, never overwritten in place, so a VM that has
  the old one mapped is not disturbed.

  Set `OTTLA_CARGO_PROFILE=dev` for a debug build.
  """
  use Mix.Task.Compiler

  @crate "ottla_nif"

  @impl true
  def run(_args) do
    root = File.cwd!()
    cargo = System.find_executable("cargo") || cargo_missing!()
    profile = System.get_env("OTTLA_CARGO_PROFILE", "release")

    args =
      ["build", "--manifest-path", Path.join(root, "Cargo.toml"), "-p", @crate] ++
        if(profile == "release", do: ["--release"], else: []) ++
        if(System.get_env("CI"), do: ["--locked"], else: [])

    case System.cmd(cargo, args, cd: root, stderr_to_stdout: true, into: IO.stream()) do
      {_, 0} ->
        :ok

      {_, code} ->
        Mix.raise("cargo build of #{@crate} failed (exit #{code}); see its output above")
    end

    dir = if profile == "release", do: "release", else: "debug"
    built = Path.join([root, "target", dir, "lib#{@crate}" <> lib_ext()])
    installed = Path.join([root, "priv", "native", "lib#{@crate}.so"])
    File.exists?(built) || Mix.raise("cargo reported success but #{built} does not exist")

    status =
      if same_file?(built, installed) do
        :noop
      else
        File.mkdir_p!(Path.dirname(installed))
        tmp = installed <> ".tmp#{System.unique_integer([:positive])}"
        File.cp!(built, tmp)
        File.rename!(tmp, installed)
        :ok
      end

    # On a fresh clone priv/ did not exist when Mix laid out _build: link it now.
    Mix.Project.build_structure()
    {status, []}
  end

  defp same_file?(a, b) do
    with {:ok, %{size: size, mtime: mtime}} <- File.stat(a),
         {:ok, %{size: ^size, mtime: other}} <- File.stat(b) do
      other >= mtime
    else
      _ -> false
    end
  end

  defp lib_ext do
    case :os.type() do
      {:unix, :darwin} -> ".dylib"
      _ -> ".so"
    end
  end

  defp cargo_missing! do
    Mix.raise("""
    Ottla needs a Rust toolchain to build its NIF, and `cargo` was not found on PATH.
    Install Rust (https://rustup.rs, or Debian's `cargo` package for Rust >= 1.91),
    make sure `cargo` is on PATH, then run mix again.
    """)
  end
end

defmodule Ottla.MixProject do
  use Mix.Project

  def project do
    [
      app: :ottla,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:ottla_nif] ++ Mix.compilers(),
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: []
    ]
  end

  def application do
    [
      extra_applications: [:logger, :crypto],
      mod: {Ottla.Application, []}
    ]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end
