defmodule Ottla.Telemetry do
  @moduledoc """
  Ottla's `:telemetry` events. Ottla has no dependencies: it emits through
  `:telemetry.execute/3` when the app has the `:telemetry` library, and does nothing (at the
  cost of one `:persistent_term` read) when it has not. Whether it has is checked once, when
  Ottla starts.

  | event | measurements | metadata |
  |---|---|---|
  | `[:ottla, :produce, :start]` | `system_time`, `count` | `topic`, `target` |
  | `[:ottla, :produce, :stop]` | `duration`, `count`, `bytes`, `failed` | `topic`, `target`, `result` (`:ok` / `:error`) |
  | `[:ottla, :produce, :exception]` | `duration` | `topic`, `target`, `kind`, `reason` |
  | `[:ottla, :transaction, :start]` | `system_time` | `connection` |
  | `[:ottla, :transaction, :stop]` | `duration` | `connection`, `result` (`:committed` / `:failed`) |
  | `[:ottla, :transaction, :exception]` | `duration` | `connection`, `kind`, `reason` (the transaction was aborted) |
  | `[:ottla, :consumer, :batch, :start]` | `system_time`, `count` | `connection`, `topic`, `partition`, `generation_id`, `attempt`, `lag` |
  | `[:ottla, :consumer, :batch, :stop]` | `duration`, `count` | the same, and `result` (`:ok` / `:error`) |
  | `[:ottla, :consumer, :batch, :exception]` | `duration`, `count` | the same, and `kind`, `reason` |
  | `[:ottla, :consumer, :ack]` | `offset` | `connection`, `topic`, `partition`, `generation_id`, `result` (`:advanced`, `:behind`, `:stale`, `:undelivered`, `:unheld`) |
  | `[:ottla, :consumer, :commit]` | `count` | `connection`, `offsets` (`[{topic, partition, offset}]`), `result` (`:ok` / `:error`) |
  | `[:ottla, :consumer, :assigned]` | `count` | `connection`, `partitions`, `generation_id` |
  | `[:ottla, :consumer, :revoked]` | `count`, `duration` (native time units) | `connection`, `partitions` |
  | `[:ottla, :consumer, :paused]`, `[:ottla, :consumer, :resumed]` | `count` (1) | `connection`, `topic`, `partition` |
  | `[:ottla, :error]` | `count` (1) | `facility`, `message` (librdkafka's client errors) |
  | `[:ottla, :statistics]` | `rx_bytes`, `tx_bytes`, `replyq`, `msg_cnt` | `client` (`:consumer` / `:producer`), `name`, `brokers` (`[%{name, rtt_avg_us, rtt_p99_us}]`), `partitions` (`[%{topic, partition, consumer_lag}]`) |

  `duration` is in native time units (`System.convert_time_unit/3`). Statistics come every
  `statistics.interval.ms` of the client's librdkafka configuration (off unless set).
  """

  @doc false
  # Called once, when Ottla starts.
  def setup do
    enabled = Code.ensure_loaded?(:telemetry) and function_exported?(:telemetry, :execute, 3)
    :persistent_term.put({__MODULE__, :enabled}, enabled)
  end

  @doc false
  @spec execute([atom], map, map) :: :ok
  def execute(event, measurements, metadata) do
    if :persistent_term.get({__MODULE__, :enabled}, false) do
      # credo:disable-for-next-line
      apply(:telemetry, :execute, [event, measurements, metadata])
    end

    :ok
  end

  @doc false
  def enabled?, do: :persistent_term.get({__MODULE__, :enabled}, false)

  @doc false
  # Runs `fun` as a start/stop/exception span. `fun` returns `{result, stop_measurements,
  # stop_metadata}`; the span's result is `result`.
  def span(prefix, start_measurements, metadata, fun) do
    if enabled?() do
      started = System.monotonic_time()

      execute(
        prefix ++ [:start],
        Map.put(start_measurements, :system_time, System.system_time()),
        metadata
      )

      try do
        {result, measurements, more} = fun.()
        duration = System.monotonic_time() - started

        execute(
          prefix ++ [:stop],
          Map.put(measurements, :duration, duration),
          Map.merge(metadata, more)
        )

        result
      catch
        kind, reason ->
          duration = System.monotonic_time() - started
          measurements = Map.put(start_measurements, :duration, duration)

          execute(
            prefix ++ [:exception],
            measurements,
            Map.merge(metadata, %{kind: kind, reason: reason})
          )

          :erlang.raise(kind, reason, __STACKTRACE__)
      end
    else
      {result, _, _} = fun.()
      result
    end
  end
end
