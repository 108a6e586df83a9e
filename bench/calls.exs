# Calls on a long-lived connection, and with endpoint lists: 200 sequential calls of each
# kind (a one-message produce, a fetch of one partition from offset 0, `Ottla.list_topics/1`,
# `Ottla.topic?/2`), p50 and p99 in milliseconds. The first call of each kind is left out
# (it creates the client the others reuse); the topic holds 10 messages of 100 bytes.
#
#   mix run bench/calls.exs        (scripts/bench calls starts the broker)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Calls do
  @messages 10

  def run do
    calls = Bench.size(200, 50)
    topic = Bench.create_topic!("calls", 1)
    sink = Bench.create_topic!("calls-produce", 1)
    :ok = Ottla.produce(Bench.endpoints(), topic, for(_ <- 1..@messages, do: Bench.value()))
    _ = Bench.start_producer!(:bench_calls)

    rows =
      for {target, label} <- [{:bench_calls, "connection"}, {Bench.endpoints(), "endpoints"}],
          {name, call} <- calls(target, topic, sink) do
        # The first call creates what the others reuse.
        :ok = call.()
        times = for _ <- 1..calls, do: time(call)
        {label, name, Bench.quantile(times, 0.5), Bench.quantile(times, 0.99)}
      end

    Bench.header("calls", [
      "#{calls} sequential calls of each kind after a first one, one partition of " <>
        "#{@messages} messages (fetch reads them all); #{Bench.machine()}"
    ])

    Bench.table(
      ["target", "call", "p50 ms", "p99 ms"],
      for({label, name, p50, p99} <- rows, do: [label, name, Bench.fmt(p50), Bench.fmt(p99)])
    )

    p50 = fn label, name ->
      Enum.find_value(rows, fn
        {^label, ^name, p, _} -> Bench.fmt(p)
        _ -> nil
      end)
    end

    IO.puts(
      "\nRATIO calls: fetch p50 #{p50.("connection", "fetch")} ms, " <>
        "list_topics p50 #{p50.("connection", "list_topics")} ms on a connection; " <>
        "#{p50.("endpoints", "fetch")} ms and #{p50.("endpoints", "list_topics")} ms " <>
        "with endpoints (targets ≤ 3 ms and ≤ 1 ms)"
    )

    Bench.delete_topic(topic)
    Bench.delete_topic(sink)
  end

  # A produce with endpoints uses a short-lived producer (not measured here); the rest take
  # either.
  defp calls(target, topic, sink) do
    produce =
      case target do
        name when is_atom(name) -> [{"produce", fn -> Ottla.produce(name, sink, "one") end}]
        _ -> []
      end

    produce ++
      [
        {"fetch",
         fn ->
           {:ok, @messages, [_ | _]} = Ottla.fetch(target, topic, partition: 0, offset: 0)
           :ok
         end},
        {"list_topics",
         fn ->
           {:ok, [_ | _]} = Ottla.list_topics(target)
           :ok
         end},
        {"topic?",
         fn ->
           true = Ottla.topic?(target, topic)
           :ok
         end}
      ]
  end

  defp time(fun) do
    t = System.monotonic_time(:microsecond)
    :ok = fun.()
    (System.monotonic_time(:microsecond) - t) / 1000
  end
end

Bench.Calls.run()
