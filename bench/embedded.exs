# Ottla.Testing's embedded cluster, as a user's tests meet it: from starting a group consumer
# (`Ottla.Supervisor.start_link/1`, what `start_supervised!/1` calls) to its first delivery;
# and from stopping that member to a new one holding the partitions again (a test that
# restarts a member), then to that member's delivery of a message produced once it holds
# them. Medians and maxima over the rounds, each on a fresh cluster.
#
#   mix run bench/embedded.exs        (needs no broker)
Code.require_file("support/bench.ex", __DIR__)

defmodule Bench.Embedded.Handler do
  use Ottla.Consumer.MessageHandler

  def init(args), do: {:ok, args}

  def handle_messages(_messages, state) do
    send(state.pid, {:delivered, System.monotonic_time(:millisecond)})
    {:ack, state}
  end
end

defmodule Bench.Embedded do
  def run do
    rounds = Bench.size(7, 2)
    results = for i <- 1..rounds, do: one_round(i)

    col = fn key -> Enum.map(results, &Map.fetch!(&1, key)) end

    IO.puts("""

    ## Embedded cluster: start and rejoin times (#{rounds} rounds)

    | from | to | median ms | max ms | target |
    |---|---|---:|---:|---|
    | start of a group consumer | its first delivery | #{Bench.median(col.(:first))} | #{Enum.max(col.(:first))} | ≤ 1000 |
    | a member's stop | the next member holds its partitions | #{Bench.median(col.(:rejoin))} | #{Enum.max(col.(:rejoin))} | ≤ 2000 |
    | a member's stop | the next member's first delivery | #{Bench.median(col.(:redelivery))} | #{Enum.max(col.(:redelivery))} | |
    """)

    IO.puts(
      "RATIO embedded: first delivery #{Enum.max(col.(:first))} ms (target ≤ 1000), " <>
        "rejoin #{Enum.max(col.(:rejoin))} ms (target ≤ 2000), at worst over #{rounds} rounds"
    )
  end

  defp one_round(i) do
    {:ok, cluster} = Ottla.Testing.start_link(brokers: 1)
    endpoints = Ottla.Testing.endpoints(cluster)
    :ok = Ottla.create_topic(endpoints, "t", partitions: 2)
    :ok = Ottla.produce(endpoints, "t", [{"a", "1"}, {"b", "2"}])

    spec = [
      connection: :"bench_embedded_#{i}",
      endpoints: endpoints,
      group_consumer: [
        group: "g",
        topics: ["t"],
        handler: Bench.Embedded.Handler,
        handler_init_args: %{pid: self()},
        begin_offset: :earliest
      ]
    ]

    t0 = now()
    {:ok, sup} = Ottla.Supervisor.start_link(spec)
    first = delivered() - t0
    Ottla.Testing.await_assignment(spec[:connection], timeout: 30_000)
    flush()

    Process.unlink(sup)
    t1 = now()
    :ok = Supervisor.stop(sup)
    {:ok, sup} = Ottla.Supervisor.start_link(spec)
    Ottla.Testing.await_assignment(spec[:connection], timeout: 30_000)
    rejoin = now() - t1
    :ok = Ottla.produce(endpoints, "t", {"c", "3"})
    redelivery = delivered() - t1

    Process.unlink(sup)
    :ok = Supervisor.stop(sup)
    Process.unlink(cluster)
    GenServer.stop(cluster)
    %{first: first, rejoin: rejoin, redelivery: redelivery}
  end

  defp now, do: System.monotonic_time(:millisecond)

  defp delivered do
    receive do
      {:delivered, at} -> at
    after
      30_000 -> raise "no delivery within 30 s"
    end
  end

  defp flush do
    receive do
      {:delivered, _} -> flush()
    after
      0 -> :ok
    end
  end
end

Bench.Embedded.run()
