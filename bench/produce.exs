# Produce 1,000,000 × 100-byte keyed messages (16-byte keys) with acks=all, in calls of 1,000
# messages: from 4 processes and from 1, Ottla's `Ottla.produce/4` through a connection's
# producer against the Rust baseline doing the same (threads sending a call's messages and
# waiting for all their delivery reports), interleaved over rounds; each run into a fresh
# 8-partition topic.
#
#   mix run bench/produce.exs        (scripts/bench produce starts the broker and builds the baseline)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Produce do
  @partitions 8
  @call 1_000

  def run do
    total = Bench.messages(1_000_000, 20_000)

    Bench.start_producer!(:bench_producer)

    contenders = [
      {"Rust baseline, 4 threads", fn t -> baseline(t, total, 4) end},
      {"Ottla, 4 processes", fn t -> ottla(t, total, 4) end},
      {"Rust baseline, 1 thread", fn t -> baseline(t, total, 1) end},
      {"Ottla, 1 process", fn t -> ottla(t, total, 1) end}
    ]

    results =
      for round <- 1..Bench.rounds(), {name, fun} <- rotate(contenders, round - 1), reduce: %{} do
        acc ->
          topic = Bench.create_topic!("produce", @partitions)
          result = fun.(topic)
          Bench.delete_topic(topic)
          IO.puts(:stderr, "round #{round}: #{name}: #{Bench.fmt_rate(result.rate)} msg/s")
          Map.update(acc, name, [result], &[result | &1])
      end

    Bench.header("produce", [
      "#{total} × #{Bench.value_bytes()} B (#{Bench.key_bytes()} B keys) in calls of #{@call}, acks=all, " <>
        "idempotent, #{@partitions} partitions, real broker, medians of #{Bench.rounds()} interleaved rounds; " <>
        Bench.machine()
    ])

    medians =
      Map.new(results, fn {name, runs} ->
        {name,
         {runs |> Enum.map(& &1.rate) |> Bench.median(),
          runs |> Enum.map(& &1.cpu_us) |> Bench.median()}}
      end)

    rows =
      for {name, _} <- contenders do
        {rate, cpu} = medians[name]

        base =
          if String.contains?(name, "4"),
            do: "Rust baseline, 4 threads",
            else: "Rust baseline, 1 thread"

        {base_rate, _} = medians[base]

        [
          name,
          Bench.fmt_rate(rate),
          Bench.fmt(rate * 116 / 1_048_576),
          Bench.fmt(cpu),
          Bench.fmt(rate / base_rate)
        ]
      end

    Bench.table(["contender", "msg/s", "MiB/s", "CPU µs/msg", "× baseline"], rows)
    [_, four, _, one] = rows

    IO.puts(
      "\nRATIO produce: Ottla 4 processes #{List.last(four)} × baseline, 1 process #{List.last(one)} × baseline"
    )
  end

  defp rotate(list, n),
    do: Enum.drop(list, rem(n, length(list))) ++ Enum.take(list, rem(n, length(list)))

  defp baseline(topic, total, threads) do
    r = Bench.baseline!(["produce", Bench.endpoints(), topic, total, threads, @call])
    %{rate: Bench.rate(r.messages, r.seconds), cpu_us: r.cpu_seconds * 1.0e6 / r.messages}
  end

  def ottla(topic, total, procs) do
    # One call warms the producer's metadata for the topic, as the baseline's first send does.
    :ok = Ottla.produce(:bench_producer, topic, [{Bench.key(0), Bench.value()}])
    {seconds, cpu} = Bench.produce_with_ottla(:bench_producer, topic, total, procs, @call)
    %{rate: Bench.rate(total, seconds), cpu_us: cpu * 1.0e6 / total}
  end
end

Bench.Produce.run()
