defmodule Ottla.LogSink do
  @moduledoc false
  # Receives librdkafka's log lines and client errors from the NIF and hands them to Logger.
  use GenServer
  require Logger

  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  # librdkafka repeats the same complaint (a broker down, say) many times a second.
  @repeat_ms 10_000

  @impl true
  def init([]) do
    :ok = Ottla.Native.log_set_process(self())
    {:ok, %{}}
  end

  @impl true
  def handle_info({:ottla_log, level, facility, message}, seen) do
    now = System.monotonic_time(:millisecond)

    case seen do
      %{^message => at} when now - at < @repeat_ms ->
        {:noreply, seen}

      _ ->
        Logger.log(level, "librdkafka: " <> message, facility: facility, domain: [:ottla])
        seen = if map_size(seen) > 1_000, do: %{}, else: seen
        {:noreply, Map.put(seen, message, now)}
    end
  end

  @impl true
  def terminate(_reason, _state) do
    Ottla.Native.log_set_process(nil)
  end
end
