# Latency from a produce call to the handler: 10,000 msg/s for 30 s (calls of 100 messages
# every 10 ms) into a group consumer with default options; p50, p99 and max of the time from
# just before `Ottla.produce/4` to the handler's first look at the message.
#
#   mix run bench/latency.exs        (scripts/bench latency starts the broker)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Latency.Handler do
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, %{collector: collector} = state) do
    now = System.monotonic_time(:microsecond)

    send(
      collector,
      {:latencies, Enum.map(messages, fn %{value: <<t::signed-64, _::binary>>} -> now - t end)}
    )

    {:ack, state}
  end
end

defmodule Bench.Latency do
  @partitions 8
  @rate 10_000
  @every_ms 10
  @per_call div(@rate * @every_ms, 1000)

  def run do
    seconds = Bench.size(30, 3)
    topic = Bench.create_topic!("latency", @partitions)

    Bench.start_producer!(:bench_latency_producer)
    Bench.start_group!(:bench_latency, topic, Bench.Latency.Handler, %{collector: self()})

    # Warm up: the group is joined and every partition delivers.
    warm = for _ <- 1..@partitions, do: stamp()
    :ok = Ottla.produce(:bench_latency_producer, topic, warm)
    collect(@partitions, [])

    pad = :binary.copy("x", Bench.value_bytes() - 8)
    producer = Task.async(fn -> produce(topic, pad, seconds * div(1000, @every_ms)) end)
    total = seconds * @rate
    {latencies, {calls, behind}} = {collect(total, []), Task.await(producer, :infinity)}
    ms = Enum.map(latencies, &(&1 / 1000))

    Bench.header("latency", [
      "#{total} messages at #{@rate} msg/s (#{@per_call} a call every #{@every_ms} ms, " <>
        "#{calls} calls, #{behind} started late) over #{seconds} s, #{@partitions} partitions, " <>
        "default options; #{Bench.machine()}"
    ])

    [p50, p99, max] = [Bench.quantile(ms, 0.5), Bench.quantile(ms, 0.99), Enum.max(ms)]

    Bench.table(["contender", "p50 ms", "p99 ms", "max ms"], [
      ["Ottla", Bench.fmt(p50), Bench.fmt(p99), Bench.fmt(max)]
    ])

    IO.puts("\nRATIO latency: p99 #{Bench.fmt(p99)} ms at #{@rate} msg/s (target ≤ 20 ms)")
  end

  defp stamp, do: <<System.monotonic_time(:microsecond)::64, 0::64>>

  # Calls at fixed times; a call that starts late (the previous one overran) counts as behind.
  defp produce(topic, pad, calls) do
    start = System.monotonic_time(:millisecond)

    behind =
      Enum.reduce(0..(calls - 1), 0, fn i, behind ->
        due = start + i * @every_ms
        wait = due - System.monotonic_time(:millisecond)
        if wait > 0, do: Process.sleep(wait)
        t = System.monotonic_time(:microsecond)

        messages =
          for j <- 1..@per_call, do: {Bench.key(i * @per_call + j), <<t::64, pad::binary>>}

        :ok = Ottla.produce(:bench_latency_producer, topic, messages)
        if wait < 0, do: behind + 1, else: behind
      end)

    {calls, behind}
  end

  defp collect(0, acc), do: acc

  defp collect(n, acc) when n < 0, do: acc

  defp collect(n, acc) do
    receive do
      {:latencies, list} -> collect(n - length(list), list ++ acc)
    after
      60_000 -> raise "only #{length(acc)} messages arrived"
    end
  end
end

Bench.Latency.run()
