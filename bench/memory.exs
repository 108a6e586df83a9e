# Memory behind a slow handler, with default options (one byte budget per consumer,
# `:max_buffered_bytes`, 128 MiB). Three runs, each sampling the OS process's RSS and the
# BEAM's memory every 100 ms while a deep backlog waits on a handler that sleeps per batch:
#
#   - 8 partitions of 100-byte messages, handler sleeping 10 ms per batch;
#   - 1,000 partitions of 100-byte messages, handler sleeping 1 s per batch;
#   - 8 partitions of 1,000,000-byte messages, handler sleeping 1 s per batch.
#
# Each run's growth is checked against the bound guides/consuming.md states (B the budget, P the
# partitions, m a message's key and value bytes):
#
#   librdkafka:  B/8 of queued messages (queued.max.messages.kbytes; as many messages at
#                about 600 B of librdkafka's own each) + one fetch response (≤ B/8)
#                + one message per partition (librdkafka returns one past any limit)
#   Rust:        B/8 of backlogs + B/8 of delivered messages kept until acked,
#                + one message per partition (taken in while just below its share)
#   BEAM:        the delivered batches (≤ what is kept, at m + 400 B a message rather than
#                m + 96), twice for garbage collection, + 256 KiB a worker process (its heap
#                behind a slow handler: 120-150 KiB each measured at 1,000 partitions) + 8 MiB
#
# It also prints the CPU time per handled message of each run: the 1,000-partition run's
# should stay within 1.3× of the 8-partition run's (work follows messages, not partitions).
#
#   mix run bench/memory.exs        (scripts/bench memory starts the broker and builds the baseline)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Memory.Handler do
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, %{counter: counter, sleep: sleep} = state) do
    Process.sleep(sleep)
    :counters.add(counter, 1, length(messages))
    {:ack, state}
  end
end

defmodule Bench.Memory do
  @budget 134_217_728

  def run do
    runs = [
      %{
        name: "8 partitions × 100 B, 10 ms a batch",
        partitions: 8,
        value: 100,
        total: Bench.messages(1_000_000, 50_000),
        sleep: 10
      },
      %{
        name: "1,000 partitions × 100 B, 1 s a batch",
        partitions: 1_000,
        value: 100,
        total: Bench.messages(2_000_000, 100_000),
        sleep: 1_000
      },
      %{
        name: "8 partitions × 1 MB, 1 s a batch",
        partitions: 8,
        value: 1_000_000,
        total: Bench.size(240, 40),
        sleep: 1_000
      }
    ]

    seconds = Bench.size(20, 6)
    # BENCH_MEMORY_RUNS=2 (or 1,3) runs some of them only.
    runs =
      case System.get_env("BENCH_MEMORY_RUNS") do
        nil -> runs
        list -> for i <- String.split(list, ","), do: Enum.at(runs, String.to_integer(i) - 1)
      end

    results = Enum.map(runs, &measure(&1, seconds))

    Bench.header("memory", [
      "Deep backlogs behind slow handlers, default options (max_buffered_bytes " <>
        "#{Bench.mb(@budget)}, max_batch 500, max_backlog 2500), sampled every 100 ms for " <>
        "#{seconds} s; " <> Bench.machine()
    ])

    Bench.table(
      [
        "run",
        "handled",
        "RSS growth",
        "bound",
        "BEAM growth",
        "CPU per message",
        "within"
      ],
      Enum.map(results, fn r ->
        [
          r.name,
          r.handled,
          Bench.mb(r.rss_growth),
          Bench.mb(r.bound),
          Bench.mb(r.beam_growth),
          "#{Bench.fmt(r.cpu_us)} µs",
          r.rss_growth <= r.bound
        ]
      end)
    )

    cpu_ratio =
      case results do
        [small, many, _large] -> many.cpu_us / max(small.cpu_us, 1.0e-9)
        _ -> 0.0
      end

    IO.puts(
      "\nRATIO memory: RSS growth " <>
        Enum.map_join(results, ", ", &"#{Bench.mb(&1.rss_growth)} of #{Bench.mb(&1.bound)}") <>
        "; CPU per message at 1,000 partitions #{Bench.fmt(cpu_ratio)}× the 8-partition run's"
    )

    unless Enum.all?(results, &(&1.rss_growth <= &1.bound)),
      do: raise("memory exceeded the stated bound")
  end

  # A fill that lost a message to a partition not led yet (a topic of 1,000 partitions is
  # still settling) is made again: duplicates in the backlog do not matter here.
  defp fill!(topic, total, value, tries \\ 2) do
    Bench.fill!(topic, total, value)
  rescue
    error in RuntimeError ->
      if tries > 1 do
        IO.puts(:stderr, "memory: fill failed, once more: #{Exception.message(error)}")
        fill!(topic, total, value, tries - 1)
      else
        reraise error, __STACKTRACE__
      end
  end

  defp measure(run, seconds) do
    topic = Bench.create_topic!("memory", run.partitions)
    fill!(topic, run.total, run.value)
    :erlang.garbage_collect()
    rss0 = Bench.proc_status_bytes("VmRSS")
    beam0 = :erlang.memory(:total)
    counter = :counters.new(1, [:atomics])
    cpu0 = Bench.cpu_seconds()

    sup =
      Bench.start_group!(:bench_memory, topic, Bench.Memory.Handler, %{
        counter: counter,
        sleep: run.sleep
      })

    samples =
      for _ <- 1..(seconds * 10) do
        Process.sleep(100)

        {Bench.proc_status_bytes("VmRSS"), :erlang.memory(:total), Bench.cpu_seconds(),
         :counters.get(counter, 1)}
      end

    handled = :counters.get(counter, 1)
    _ = cpu0
    # CPU per message while messages flow: from the first sample past a tenth of what was
    # handled to the first past nine tenths (start-up and an idle tail left out).
    flowing = Enum.filter(samples, fn {_, _, _, n} -> n >= div(handled, 10) end)
    {_, _, cpu_a, n_a} = hd(flowing)

    {_, _, cpu_b, n_b} =
      Enum.find(flowing, List.last(flowing), fn {_, _, _, n} -> n >= div(handled * 9, 10) end)

    cpu_us = if n_b > n_a, do: (cpu_b - cpu_a) * 1.0e6 / (n_b - n_a), else: 0.0
    {:ok, stats} = Ottla.stats(:bench_memory)
    Supervisor.stop(sup)
    Bench.delete_topic(topic)

    m = Bench.key_bytes() + run.value
    p = run.partitions
    eighth = div(@budget, 8)
    # librdkafka: the queue (by bytes, or by count at ~600 B each) and one fetch response,
    # plus one message per partition.
    rdkafka = min(eighth, div(eighth, 1024) * (m + 600)) + eighth + p * (m + 600)
    rust = 2 * eighth + p * (m + 96)
    beam = 2 * round(eighth * (m + 400) / (m + 96)) + p * (m + 262_144) + 8 * 1_048_576
    rss_peak = samples |> Enum.map(&elem(&1, 0)) |> Enum.max()
    beam_peak = samples |> Enum.map(&elem(&1, 1)) |> Enum.max()

    Map.merge(run, %{
      handled: handled,
      rss_growth: rss_peak - rss0,
      beam_growth: beam_peak - beam0,
      bound: rdkafka + rust + beam,
      buffered: stats.buffered_bytes,
      cpu_us: cpu_us
    })
  end
end

Bench.Memory.run()
