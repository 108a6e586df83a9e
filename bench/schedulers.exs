# Scheduler friendliness: while Ottla produces 200,000 messages from 4 processes (calls of
# 1,000) and while a group consumer with default options consumes them, count the VM's
# long_schedule events over 1 ms (a process or port that kept a scheduler longer than that),
# split into those attributable to Ottla (a process running Ottla's code, or a NIF of
# `Ottla.Native`) and the others, and measure the normal schedulers' utilisation
# (`:scheduler.utilization/1`). Ottla's target: 0 long schedules. A long_schedule event
# counts wall time, so the OS preempting a scheduler thread (2 cores shared with the broker
# and librdkafka's threads) or a garbage collection counts too; the consumer's hot NIFs time
# their own CPU, which shows whether a NIF did the work.
#
#   mix run bench/schedulers.exs        (scripts/bench schedulers starts the broker)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Schedulers do
  @partitions 8

  def run do
    total = Bench.messages(200_000, 20_000)
    topic = Bench.create_topic!("schedulers", @partitions)

    Bench.start_producer!(:bench_sched_producer)

    :ok = Ottla.produce(:bench_sched_producer, topic, [{Bench.key(0), Bench.value()}])

    {{seconds, _cpu}, produce} =
      Bench.watch(fn ->
        Bench.produce_with_ottla(:bench_sched_producer, topic, total, 4, 1_000)
      end)

    counter = :counters.new(3, [:atomics])

    {_, consume} =
      Bench.watch(fn ->
        sup =
          Bench.start_group!(:bench_sched_consumer, topic, Bench.CountingHandler, %{
            counter: counter
          })

        Bench.wait_until(
          fn -> :counters.get(counter, 1) >= total + 1 end,
          300_000,
          "all messages",
          5
        )

        Supervisor.stop(sup)
      end)

    Bench.delete_topic(topic)

    Bench.header("schedulers", [
      "#{total} × #{Bench.value_bytes()} B produced from 4 processes (#{Bench.fmt_rate(total / seconds)} msg/s), " <>
        "then consumed by a group consumer with default options (join and stop included); " <>
        "long_schedule threshold 1 ms; #{Bench.machine()}"
    ])

    rows =
      for {name, w} <- [{"produce", produce}, {"consume", consume}] do
        [
          name,
          w.long_schedules_ottla,
          w.worst_ottla_ms,
          w.long_schedules_other,
          "#{w.nif_calls} / #{w.nif_max_cpu_us} / #{w.nif_max_wall_us}",
          Bench.fmt(w.utilisation * 100) <> " %"
        ]
      end

    Bench.table(
      [
        "phase",
        "long schedules from Ottla",
        "worst (ms)",
        "other long schedules",
        "timed NIF calls / max CPU µs / max wall µs",
        "scheduler utilisation"
      ],
      rows
    )

    for {name, w} <- [{"produce", produce}, {"consume", consume}], w.ottla_events != [] do
      IO.puts("\n#{name}: Ottla's long schedules, first ones: #{inspect(w.ottla_events)}")
    end

    IO.puts(
      "\nRATIO schedulers: #{produce.long_schedules_ottla + consume.long_schedules_ottla} long schedules from Ottla (target 0)"
    )
  end
end

Bench.Schedulers.run()
