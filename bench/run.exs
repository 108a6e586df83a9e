# Throughput of Ottla's produce and group-consume paths on the embedded mock cluster.
#
#   mix bench                          # 200,000 × 100-byte messages over 8 partitions
#   BENCH_MESSAGES=500000 mix bench
#   BENCH_TELEMETRY=1 mix bench        # with a :telemetry module loaded, so Ottla emits events
#
# Consume time runs from the first delivered batch to the last (the group join is left out);
# the handler counts messages and acks every batch.

defmodule Bench.Handler do
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, %{counter: counter, done: done, total: total} = state) do
    :counters.add(counter, 1, length(messages))

    if :counters.get(counter, 1) >= total, do: send(done, :done)
    {:ack, state}
  end
end

if System.get_env("BENCH_TELEMETRY") == "1" and not Code.ensure_loaded?(:telemetry) do
  # A stand-in with the cost of a real handler lookup and call: Ottla emits every event.
  defmodule :telemetry do
    def execute(event, measurements, metadata) do
      :ets.lookup(:bench_telemetry, event)
      _ = {measurements, metadata}
      :ok
    end
  end

  :ets.new(:bench_telemetry, [:named_table, :public, read_concurrency: true])
  Ottla.Telemetry.setup()
end

IO.puts("telemetry: #{if Ottla.Telemetry.enabled?(), do: "emitting", else: "off"}")
total = String.to_integer(System.get_env("BENCH_MESSAGES", "200000"))
partitions = 8
value = :binary.copy("x", 100)
{:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
:ok = Ottla.create_topic(endpoints, "bench", partitions: partitions)

{:ok, _} =
  Ottla.Supervisor.start_link(connection: :bench_producer, endpoints: endpoints, producer: [])

messages = for i <- 1..total, do: {Integer.to_string(i), value}

{produce_us, :ok} =
  :timer.tc(fn -> Ottla.produce(:bench_producer, "bench", messages, timeout: 120_000) end)

counter = :counters.new(1, [])
parent = self()

{:ok, _} =
  Ottla.Supervisor.start_link(
    connection: :bench_consumer,
    endpoints: endpoints,
    group_consumer: [
      group: "bench",
      topics: ["bench"],
      handler: Bench.Handler,
      handler_init_args: %{counter: counter, done: parent, total: total},
      begin_offset: :earliest,
      max_batch: 500,
      max_backlog: 5_000
    ]
  )

# Wait for the first delivery, then time the rest.
Stream.repeatedly(fn -> Process.sleep(1) end)
|> Enum.find(fn _ -> :counters.get(counter, 1) > 0 end)

started = System.monotonic_time(:microsecond)
first = :counters.get(counter, 1)

receive do
  :done -> :ok
after
  120_000 -> raise "consumed only #{:counters.get(counter, 1)} of #{total} in 120 s"
end

consume_us = System.monotonic_time(:microsecond) - started
rate = fn n, us -> round(n / (us / 1_000_000)) end

IO.puts("""
messages:  #{total} × 100 B over #{partitions} partitions (embedded mock cluster)
produce:   #{div(produce_us, 1000)} ms, #{rate.(total, produce_us)} msg/s (one call, acks=all)
consume:   #{div(consume_us, 1000)} ms, #{rate.(total - first, consume_us)} msg/s (group consumer, ack per batch)
""")
