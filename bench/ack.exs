# The ack path: acks per second from 8 processes, each acking the messages of one partition
# one by one with `Ottla.Group.Acknowledger.ack/5` (every ack advances its partition).
#
#   mix run bench/ack.exs        (scripts/bench ack starts the broker and builds the baseline)
#
# 1,000,000 messages on 8 partitions are first delivered to a handler that acks nothing
# (`{:continue, state}`), so that each one can then be acked from outside, as an app that
# acks later does. There is no Rust baseline: librdkafka has no ack path of its own.
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Ack.Handler do
  use Ottla.Consumer.MessageHandler

  def handle_messages([first | _] = messages, %{counter: counter, table: table} = state) do
    :ets.insert(table, {first.partition, first.generation_id, List.last(messages).offset})
    :counters.add(counter, 1, length(messages))
    {:continue, state}
  end
end

defmodule Bench.Ack do
  @partitions 8
  @procs 8

  def run do
    total = Bench.messages(1_000_000, 40_000)
    per = div(total, @partitions)
    total = per * @partitions
    topic = Bench.create_topic!("ack", @partitions)
    Bench.fill!(topic, total)

    rates =
      for round <- 1..Bench.rounds() do
        rate = round(topic, total)
        IO.puts(:stderr, "round #{round}: #{Bench.fmt_rate(rate)} acks/s")
        rate
      end

    Bench.delete_topic(topic)

    Bench.header("ack path", [
      "#{total} acks of #{@partitions} partitions from #{@procs} processes " <>
        "(`Ottla.Group.Acknowledger.ack/5`, one process a partition, each ack advancing), " <>
        "medians of #{Bench.rounds()} rounds; #{Bench.machine()}"
    ])

    rate = Bench.median(rates)

    Bench.table(["contender", "acks/s", "µs per ack (wall, 8 processes)"], [
      ["Ottla ack/5", Bench.fmt_rate(rate), Bench.fmt(1.0e6 / rate)]
    ])

    IO.puts("\nRATIO ack: #{Bench.fmt_rate(rate)} acks/s (target 1 M acks/s)")
  end

  defp round(topic, total) do
    counter = :counters.new(1, [:atomics])
    table = :ets.new(:bench_ack, [:public, :set])
    name = :"bench_ack_#{System.unique_integer([:positive])}"

    # Everything stays delivered and unacked until the measured acks (the baseline producer
    # spreads keys over the partitions unevenly: room for all of them).
    sup =
      Bench.start_group!(name, topic, Bench.Ack.Handler, %{counter: counter, table: table},
        max_batch: 10_000,
        max_backlog: total
      )

    Bench.wait_until(fn -> :counters.get(counter, 1) >= total end, 300_000, "every delivery", 10)
    # Offsets start at 0 in a fresh topic: a partition holds last + 1 messages.
    counts = for {p, generation, last} <- :ets.tab2list(table), do: {p, generation, last + 1}
    t0 = System.monotonic_time(:microsecond)

    counts
    |> Enum.map(fn {p, generation, n} ->
      Task.async(fn -> ack_all(name, topic, p, generation, n) end)
    end)
    |> Enum.each(&Task.await(&1, :infinity))

    seconds = (System.monotonic_time(:microsecond) - t0) / 1.0e6

    # Every ack landed: the latest offset of each partition is "acked + 1".
    for {p, _, n} <- counts do
      latest = Ottla.Group.Acknowledger.get_latest_offset(name, topic, p)
      if latest != n, do: raise("partition #{p}: latest offset #{inspect(latest)}, expected #{n}")
    end

    Supervisor.stop(sup)
    Bench.rate(total, seconds)
  end

  defp ack_all(name, topic, partition, generation, n) do
    for offset <- 0..(n - 1)//1 do
      :ok = Ottla.Group.Acknowledger.ack(name, topic, partition, generation, offset)
    end
  end
end

Bench.Ack.run()
