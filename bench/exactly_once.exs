# Consume–transform–produce pipelines on the real broker: 100-byte messages (16-byte keys) on
# 8 input partitions, each written to an output topic by a group consumer's handler. Exactly
# once (`exactly_once: true`, the handler returns {:produce, output, state}: each batch's
# output and offset commit in one transaction, shared by the batches ready at the same time) beside at least once (the handler produces
# through its connection, then acks). Time from the consumer's start until the group's
# committed offsets reach the input's end; medians of interleaved rounds.
#
#   mix run bench/exactly_once.exs        (scripts/bench exactly_once starts the broker)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.ExactlyOnce.Handler do
  use Ottla.Consumer.MessageHandler

  def init(args), do: {:ok, args}

  def handle_messages(messages, %{mode: :exactly_once, out: out} = state),
    do: {:produce, for(m <- messages, do: {out, {m.key, m.value}}), state}

  def handle_messages(messages, %{mode: :at_least_once, out: out, connection: conn} = state) do
    :ok = Ottla.produce(conn, out, for(m <- messages, do: {m.key, m.value}))
    {:ack, state}
  end
end

defmodule Bench.ExactlyOnce do
  @partitions 8

  def run do
    total = Bench.messages(200_000, 10_000)
    input = Bench.create_topic!("eos-in", @partitions)
    Bench.fill!(input, total)

    contenders = [
      {"at least once (produce, then ack)", :at_least_once},
      {"exactly once (batches ready together share a transaction)", :exactly_once}
    ]

    results =
      for round <- 1..Bench.rounds(), {name, mode} <- contenders, reduce: %{} do
        acc ->
          rate = pipeline(mode, input, total, round)
          IO.puts(:stderr, "round #{round}: #{name}: #{Bench.fmt_rate(rate)} msg/s")
          Map.update(acc, name, [rate], &[rate | &1])
      end

    Bench.delete_topic(input)

    Bench.header("exactly_once", [
      "#{total} × #{Bench.value_bytes()} B (#{Bench.key_bytes()} B keys), #{@partitions} " <>
        "partitions in and out, real broker, max_batch 500, medians of #{Bench.rounds()} " <>
        "interleaved rounds; #{Bench.machine()}"
    ])

    rows =
      for {name, _} <- contenders,
          do: [name, Bench.fmt_rate(Bench.median(Map.fetch!(results, name)))]

    Bench.table(["pipeline", "msg/s"], rows)

    eos =
      Bench.median(
        Map.fetch!(results, "exactly once (batches ready together share a transaction)")
      )

    alo = Bench.median(Map.fetch!(results, "at least once (produce, then ack)"))

    IO.puts(
      "\nRATIO exactly_once: #{Bench.fmt_rate(eos)} msg/s (target ≥ 150 k), " <>
        "at least once #{Bench.fmt_rate(alo)} msg/s"
    )
  end

  defp pipeline(mode, input, total, round) do
    out = Bench.create_topic!("eos-out", @partitions)
    conn = :"bench_eos_#{mode}_#{round}"
    group = Bench.group_name()

    group_consumer =
      [
        group: group,
        topics: [input],
        handler: Bench.ExactlyOnce.Handler,
        handler_init_args: %{mode: mode, out: out, connection: conn},
        begin_offset: :earliest
      ] ++ if(mode == :exactly_once, do: [exactly_once: true], else: [])

    started = System.monotonic_time(:millisecond)

    {:ok, sup} =
      Ottla.Supervisor.start_link(
        connection: conn,
        endpoints: Bench.endpoints(),
        producer: [],
        group_consumer: group_consumer
      )

    wait_committed(conn, total)
    seconds = (System.monotonic_time(:millisecond) - started) / 1000
    Process.unlink(sup)
    Supervisor.stop(sup)
    Bench.delete_topic(out)
    Bench.rate(total, seconds)
  end

  # Until the committed offsets of all partitions add up to `total`.
  defp wait_committed(conn, total) do
    committed =
      case Ottla.stats(conn) do
        {:ok, %{partitions: rows}} -> rows |> Enum.map(&(&1.committed || 0)) |> Enum.sum()
        _ -> 0
      end

    if committed < total do
      Process.sleep(20)
      wait_committed(conn, total)
    end
  end
end

Bench.ExactlyOnce.run()
