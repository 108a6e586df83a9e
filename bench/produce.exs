# Produce 1,000,000 × 100-byte keyed messages (16-byte keys) with acks=all, in calls of 1,000
# messages: from 4 processes and from 1, Ottla's `Ottla.produce/4` through a connection's
# producer against the Rust baseline doing the same (threads sending a call's messages and
# waiting for all their delivery reports), and against the baseline with every message queued
# at once (one thread hands all 1,000,000 to librdkafka, then awaits every report); then
# 4 processes each sending to a partition of its own, against 4 baseline threads doing the
# same. Interleaved over rounds; each run into a fresh 8-partition topic. The reference for
# each Ottla figure is the better of the baseline's figures for it: the same calls, or all
# queued at once.
#
#   mix run bench/produce.exs        (scripts/bench produce starts the broker and builds the baseline)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Produce do
  @partitions 8
  @call 1_000

  @all_at_once "Rust baseline, all queued at once"

  def run do
    total = Bench.messages(1_000_000, 20_000)

    Bench.start_producer!(:bench_producer)

    contenders = [
      {@all_at_once, fn t -> baseline(t, total, 1, total, "keyed") end},
      {"Rust baseline, 4 threads", fn t -> baseline(t, total, 4, @call, "keyed") end},
      {"Ottla, 4 processes", fn t -> ottla(t, total, 4, []) end},
      {"Rust baseline, 1 thread", fn t -> baseline(t, total, 1, @call, "keyed") end},
      {"Ottla, 1 process", fn t -> ottla(t, total, 1, []) end},
      {"Rust baseline, 4 threads, a partition each",
       fn t -> baseline(t, total, 4, @call, "by-thread") end},
      {"Ottla, 4 processes, a partition each", fn t -> ottla(t, total, 4, by_process: true) end}
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

        {ratio, cpu_ratio} =
          case reference(name) do
            nil ->
              {"", ""}

            refs ->
              {best_rate, best_cpu} = refs |> Enum.map(&medians[&1]) |> Enum.max_by(&elem(&1, 0))
              {Bench.fmt(rate / best_rate), Bench.fmt(cpu / best_cpu)}
          end

        [
          name,
          Bench.fmt_rate(rate),
          Bench.fmt(rate * 116 / 1_048_576),
          Bench.fmt(cpu),
          ratio,
          cpu_ratio
        ]
      end

    Bench.table(
      ["contender", "msg/s", "MiB/s", "CPU µs/msg", "× best baseline", "CPU × that baseline"],
      rows
    )

    ratio = fn name -> rows |> Enum.find(&(hd(&1) == name)) |> Enum.at(4) end

    IO.puts(
      "\nRATIO produce: Ottla 4 processes #{ratio.("Ottla, 4 processes")} × baseline, " <>
        "1 process #{ratio.("Ottla, 1 process")} × baseline, " <>
        "4 processes a partition each #{ratio.("Ottla, 4 processes, a partition each")} × baseline"
    )
  end

  # The baselines an Ottla figure is held against: the faster one (median msg/s) counts, for
  # the msg/s ratio and the CPU ratio alike.
  defp reference("Ottla, 4 processes"), do: [@all_at_once, "Rust baseline, 4 threads"]
  defp reference("Ottla, 1 process"), do: [@all_at_once, "Rust baseline, 1 thread"]

  defp reference("Ottla, 4 processes, a partition each"),
    do: [@all_at_once, "Rust baseline, 4 threads, a partition each"]

  defp reference(_baseline), do: nil

  defp rotate(list, n),
    do: Enum.drop(list, rem(n, length(list))) ++ Enum.take(list, rem(n, length(list)))

  defp baseline(topic, total, threads, call, placement) do
    r =
      Bench.baseline!([
        "produce",
        Bench.endpoints(),
        topic,
        total,
        threads,
        call,
        Bench.value_bytes(),
        placement
      ])

    %{rate: Bench.rate(r.messages, r.seconds), cpu_us: r.cpu_seconds * 1.0e6 / r.messages}
  end

  def ottla(topic, total, procs, opts) do
    # One call warms the producer's metadata for the topic, as the baseline's first send does.
    :ok = Ottla.produce(:bench_producer, topic, [{Bench.key(0), Bench.value()}])
    {seconds, cpu} = Bench.produce_with_ottla(:bench_producer, topic, total, procs, @call, opts)
    %{rate: Bench.rate(total, seconds), cpu_us: cpu * 1.0e6 / total}
  end
end

Bench.Produce.run()
