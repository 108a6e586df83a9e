# Group consume into a handler that counts and acks each batch: Ottla with its default
# options, Ottla tuned, and the Rust baseline (rdkafka directly), interleaved over rounds.
#
#   mix run bench/consume.exs        (scripts/bench consume starts the broker and builds the baseline)
#
# 1,000,000 × 100-byte messages with 16-byte keys on 8 partitions, filled once. Each contender
# reads them all with a fresh group; time and CPU run from its first message to its last.
# "fetched/delivered" is what the consumer received from the broker (librdkafka's rx bytes)
# over the bytes of keys and values it delivered: near 1 means nothing was fetched twice.
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Consume do
  @partitions 8

  def run do
    total = Bench.messages(1_000_000, 20_000)
    topic = Bench.create_topic!("consume", @partitions)
    Bench.fill!(topic, total)

    contenders = [
      {"Rust baseline (rdkafka)", fn -> baseline(topic, total) end},
      {"Ottla, default options", fn -> ottla(topic, total, []) end},
      {"Ottla, max_batch 1000, max_buffered_bytes 512 MiB",
       fn -> ottla(topic, total, max_batch: 1_000, max_buffered_bytes: 536_870_912) end}
    ]

    results =
      for round <- 1..Bench.rounds(),
          # Interleaved, each round in a rotated order.
          {name, fun} <- rotate(contenders, round - 1),
          reduce: %{} do
        acc ->
          result = fun.()
          IO.puts(:stderr, "round #{round}: #{name}: #{Bench.fmt_rate(result.rate)} msg/s")
          Map.update(acc, name, [result], &[result | &1])
      end

    Bench.delete_topic(topic)

    base =
      results |> Map.fetch!("Rust baseline (rdkafka)") |> Enum.map(& &1.rate) |> Bench.median()

    Bench.header("consume", [
      "#{total} × #{Bench.value_bytes()} B (#{Bench.key_bytes()} B keys), #{@partitions} partitions, " <>
        "real broker, medians of #{Bench.rounds()} interleaved rounds; #{Bench.machine()}"
    ])

    rows =
      for {name, _} <- contenders do
        runs = Map.fetch!(results, name)
        rate = runs |> Enum.map(& &1.rate) |> Bench.median()
        cpu = runs |> Enum.map(& &1.cpu_us) |> Bench.median()
        fetched = runs |> Enum.map(& &1.fetched_ratio) |> Enum.reject(&is_nil/1)

        [
          name,
          Bench.fmt_rate(rate),
          Bench.fmt(rate * (Bench.value_bytes() + Bench.key_bytes()) / 1_048_576),
          Bench.fmt(cpu),
          if(fetched == [], do: "-", else: Bench.fmt(Bench.median(fetched))),
          Bench.fmt(rate / base)
        ]
      end

    Bench.table(
      ["contender", "msg/s", "MiB/s", "CPU µs/msg", "fetched/delivered", "× baseline"],
      rows
    )

    [_, default, tuned] = rows

    IO.puts(
      "\nRATIO consume: Ottla default #{List.last(default)} × baseline, Ottla tuned #{List.last(tuned)} × baseline"
    )
  end

  defp rotate(list, n),
    do: Enum.drop(list, rem(n, length(list))) ++ Enum.take(list, rem(n, length(list)))

  defp baseline(topic, total) do
    r = Bench.baseline!(["consume", Bench.endpoints(), topic, Bench.group_name(), total])

    %{
      rate: Bench.rate(r.messages, r.seconds),
      cpu_us: r.cpu_seconds * 1.0e6 / r.messages,
      fetched_ratio: nil
    }
  end

  defp ottla(topic, total, options) do
    counter = :counters.new(3, [:atomics])
    name = :"bench_consume_#{System.unique_integer([:positive])}"
    sink = Process.whereis(Ottla.LogSink)
    :erlang.trace(sink, true, [:receive, {:tracer, self()}])

    sup =
      Bench.start_group!(
        name,
        topic,
        Bench.CountingHandler,
        %{counter: counter},
        [config: ["statistics.interval.ms": 500]] ++ options
      )

    Bench.wait_until(fn -> :counters.get(counter, 1) > 0 end, 120_000, "a first delivery", 1)
    cpu0 = Bench.cpu_seconds()
    Bench.wait_until(fn -> :counters.get(counter, 1) >= total end, 600_000, "all messages", 1)
    finished = System.monotonic_time(:microsecond)
    cpu = Bench.cpu_seconds() - cpu0
    first = :counters.get(counter, 3)
    delivered_bytes = :counters.get(counter, 2)
    # The statistics after the run hold everything fetched.
    Process.sleep(1_100)
    rx = last_rx_bytes(nil)
    :erlang.trace(sink, false, [:receive])
    Supervisor.stop(sup)
    seconds = (finished - first) / 1.0e6

    %{
      rate: Bench.rate(total, seconds),
      cpu_us: cpu * 1.0e6 / total,
      fetched_ratio: rx && rx / delivered_bytes
    }
  end

  # The consumer's rx_bytes in the latest statistics LogSink received.
  defp last_rx_bytes(acc) do
    receive do
      {:trace, _, :receive, {:ottla_statistics, %{client: "consumer", rx_bytes: rx}}} ->
        last_rx_bytes(rx)

      {:trace, _, :receive, _} ->
        last_rx_bytes(acc)
    after
      0 -> acc
    end
  end
end

Bench.Consume.run()
