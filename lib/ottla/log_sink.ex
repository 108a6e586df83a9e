defmodule Ottla.LogSink do
  @moduledoc false
  # Receives librdkafka's log lines and client errors from the NIF and hands them to Logger,
  # without what librdkafka may quote from a secret (Ottla.Secrets.redact_text/1). It also
  # installs Ottla.Secrets' :logger filter, which keeps secret config values out of crash and
  # supervisor reports.
  use GenServer
  require Logger

  def start_link(_opts), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  # librdkafka repeats the same complaint (a broker down, say) many times a second.
  @repeat_ms 10_000

  @impl true
  def init([]) do
    # So that terminate/2 runs at shutdown too.
    Process.flag(:trap_exit, true)
    :ok = Ottla.Secrets.install_log_filter()
    :ok = Ottla.Native.log_set_process(self())
    {:ok, %{}}
  end

  @impl true
  def handle_info({:ottla_log, level, facility, message}, seen) do
    now = System.monotonic_time(:millisecond)
    message = Ottla.Secrets.redact_text(message)

    # Every error counts for telemetry, even those the log collapses.
    if level in [:error, :critical, :alert, :emergency] do
      Ottla.Telemetry.execute([:ottla, :error], %{count: 1}, %{
        facility: facility,
        message: message
      })
    end

    case seen do
      %{^message => at} when now - at < @repeat_ms ->
        {:noreply, seen}

      _ ->
        Logger.log(level, "librdkafka: " <> message, facility: facility, domain: [:ottla])

        seen = if map_size(seen) > 1_000, do: %{}, else: seen
        {:noreply, Map.put(seen, message, now)}
    end
  end

  # librdkafka's statistics (statistics.interval.ms), summarized by the NIF.
  def handle_info({:ottla_statistics, summary}, seen) when is_map(summary) do
    {measurements, metadata} = Map.split(summary, [:rx_bytes, :tx_bytes, :replyq, :msg_cnt])
    client = if metadata.client == "consumer", do: :consumer, else: :producer
    Ottla.Telemetry.execute([:ottla, :statistics], measurements, %{metadata | client: client})
    {:noreply, seen}
  end

  def handle_info({:EXIT, _pid, _reason}, seen), do: {:noreply, seen}

  # Anything else (a stray message) must not take the sink, and with it Ottla, down.
  def handle_info(_other, seen), do: {:noreply, seen}

  @impl true
  def terminate(_reason, _state) do
    Ottla.Native.log_set_process(nil)
    Ottla.Secrets.remove_log_filter()
  end
end
