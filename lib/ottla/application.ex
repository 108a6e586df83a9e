defmodule Ottla.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Ottla.Telemetry.setup()

    children = [
      {Registry, keys: :unique, name: Ottla.Registry},
      Ottla.LogSink
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: Ottla.AppSupervisor)
  end
end
