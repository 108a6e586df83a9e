defmodule Ottla.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Ottla.Telemetry.setup()

    children = [
      %{id: Ottla.Registry, start: {__MODULE__, :start_registry, []}, type: :supervisor},
      Ottla.LogSink
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Ottla.AppSupervisor)
  end

  @doc false
  # A Registry killed from outside leaves its partition process (which holds the registry's
  # name and tables) behind for a moment: a restart before it is gone fails, every retry
  # fails at once, and the whole application stopped. Wait (bounded) for it first.
  def start_registry do
    wait_for_leftovers(System.monotonic_time(:millisecond) + 5_000)
    Registry.start_link(keys: :unique, name: Ottla.Registry)
  end

  defp wait_for_leftovers(deadline) do
    leftover? =
      :ets.whereis(Ottla.Registry) != :undefined or
        Enum.any?(
          Process.registered(),
          &String.starts_with?(Atom.to_string(&1), "Elixir.Ottla.Registry.")
        )

    if leftover? and System.monotonic_time(:millisecond) < deadline do
      Process.sleep(5)
      wait_for_leftovers(deadline)
    end
  end
end
