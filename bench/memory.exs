# Memory behind a slow handler: 1,000,000 × 100-byte messages wait on 8 partitions while a
# handler with default options sleeps 10 ms per batch. Samples the OS process's RSS and the
# BEAM's memory every 100 ms for 20 s and checks their growth against the bound the README
# states:
#
#   Rust:  partitions × 2 × max_backlog × (m + 100 B)          (backlog + delivered, unacked)
#          + partitions × (min(20,000, 4 MiB / m) + 1 MiB / m) × (m + 600 B)
#                          (librdkafka's prefetch: queued.min.messages or
#                           queued.max.messages.kbytes, and one fetch response)
#   BEAM:  partitions × 4 × max_batch × (m + 400 B)            (a worker's batch being handled,
#          + 8 MiB (code and processes of a connection)        the next one, and room for GC)
#
# where m is the bytes of a message's key and value.
#
#   mix run bench/memory.exs        (scripts/bench memory starts the broker and builds the baseline)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Memory.Handler do
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, %{counter: counter} = state) do
    Process.sleep(10)
    :counters.add(counter, 1, length(messages))
    {:ack, state}
  end
end

defmodule Bench.Memory do
  @partitions 8

  def run do
    total = Bench.messages(1_000_000, 50_000)
    seconds = Bench.size(20, 5)
    topic = Bench.create_topic!("memory", @partitions)
    Bench.fill!(topic, total)
    :erlang.garbage_collect()
    rss0 = Bench.proc_status_bytes("VmRSS")
    beam0 = :erlang.memory(:total)
    counter = :counters.new(1, [:atomics])

    sup = Bench.start_group!(:bench_memory, topic, Bench.Memory.Handler, %{counter: counter})

    samples =
      for _ <- 1..(seconds * 10) do
        Process.sleep(100)
        {Bench.proc_status_bytes("VmRSS"), :erlang.memory(:total)}
      end

    handled = :counters.get(counter, 1)
    Supervisor.stop(sup)
    Bench.delete_topic(topic)

    {max_batch, max_backlog} = {500, 2500}
    message = Bench.key_bytes() + Bench.value_bytes()
    queued = min(20_000, div(4 * 1_048_576, message)) + div(1_048_576, message)
    rust_bound = @partitions * (2 * max_backlog * (message + 100) + queued * (message + 600))
    beam_bound = @partitions * 4 * max_batch * (message + 400) + 8 * 1_048_576
    rss_peak = samples |> Enum.map(&elem(&1, 0)) |> Enum.max()
    beam_peak = samples |> Enum.map(&elem(&1, 1)) |> Enum.max()
    rss_growth = rss_peak - rss0
    beam_growth = beam_peak - beam0

    Bench.header("memory", [
      "#{total} × #{Bench.value_bytes()} B waiting on #{@partitions} partitions behind a handler " <>
        "sleeping 10 ms per batch, default options (max_batch #{max_batch}, max_backlog " <>
        "#{max_backlog}), sampled every 100 ms for #{seconds} s (#{handled} handled meanwhile); " <>
        Bench.machine()
    ])

    Bench.table(
      ["measure", "before", "peak", "growth", "bound on growth", "within"],
      [
        [
          "OS RSS (VmRSS)",
          Bench.mb(rss0),
          Bench.mb(rss_peak),
          Bench.mb(rss_growth),
          Bench.mb(rust_bound + beam_bound),
          rss_growth <= rust_bound + beam_bound
        ],
        [
          "BEAM (:erlang.memory(:total))",
          Bench.mb(beam0),
          Bench.mb(beam_peak),
          Bench.mb(beam_growth),
          Bench.mb(beam_bound),
          beam_growth <= beam_bound
        ]
      ]
    )

    IO.puts(
      "\nRATIO memory: RSS growth #{Bench.mb(rss_growth)} of a #{Bench.mb(rust_bound + beam_bound)} bound, " <>
        "BEAM growth #{Bench.mb(beam_growth)} of #{Bench.mb(beam_bound)}"
    )

    unless rss_growth <= rust_bound + beam_bound and beam_growth <= beam_bound,
      do: raise("memory exceeded the stated bound")
  end
end

Bench.Memory.run()
