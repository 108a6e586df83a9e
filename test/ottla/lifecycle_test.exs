defmodule Ottla.LifecycleTest do
  # Not async: system_monitor is VM-wide, and thread counts must not see other tests' clients.
  use ExUnit.Case, async: false

  import Ottla.TestSupport

  @moduletag timeout: 240_000

  defp ottla_process?(pid) do
    case Process.info(pid, :dictionary) do
      {:dictionary, dict} ->
        case dict[:"$initial_call"] do
          {module, _, _} -> String.starts_with?(Atom.to_string(module), "Elixir.Ottla.")
          _ -> false
        end

      nil ->
        false
    end
  end

  # Calls the NIFs that run on normal schedulers, yielding between calls so each call is one
  # scheduling slot of its own.
  defp hammer(conn, topic, parent) do
    receive do
      :stop ->
        send(parent, :hammer_done)
    after
      0 ->
        for p <- 0..3 do
          latest = Ottla.Group.Acknowledger.get_latest_offset(conn, topic, p)
          :erlang.yield()

          # Re-acking what is already acked: a real ack call that changes nothing.
          if latest do
            :ok = Ottla.Group.Acknowledger.ack(conn, topic, p, 1, latest - 1)
            :erlang.yield()
          end
        end

        {:ok, _} = Ottla.stats(conn)
        # A pause between rounds: the point is many NIF calls during consumption, not a
        # process that is always runnable.
        Process.sleep(1)
        hammer(conn, topic, parent)
    end
  end

  test "file reads stay fast while 50 fetches wait on an unreachable broker" do
    path = Path.join(System.tmp_dir!(), "ottla-read-#{System.unique_integer([:positive])}")
    File.write!(path, "hello")
    on_exit(fn -> File.rm(path) end)

    fetches =
      for _ <- 1..50 do
        Task.async(fn -> Ottla.fetch([{"127.0.0.1", 1}], "t", timeout: 4_000) end)
      end

    # Let every fetch reach its wait on the network.
    Process.sleep(300)

    reads =
      for _ <- 1..20 do
        {micros, {:ok, "hello"}} = :timer.tc(fn -> File.read(path) end)
        Process.sleep(50)
        micros
      end

    results = Task.await_many(fetches, 10_000)
    assert Enum.all?(results, &match?({:error, %Ottla.Error{}}, &1))

    # Were the fetches waiting on dirty I/O schedulers (10 of them), each read would wait
    # for seconds behind them.
    assert Enum.max(reads) < 200_000,
           "the slowest of 20 file reads took #{div(Enum.max(reads), 1000)} ms while fetches waited"
  end

  test "no NIF call holds a normal scheduler for 1 ms while 100,000 messages are consumed through a rebalance" do
    topic = create_topic!(partitions: 4)
    value = String.duplicate("x", 100)

    for p <- 0..3 do
      :ok =
        Ottla.produce(endpoints(), topic, for(i <- 1..25_000, do: {"k#{i}", value}), partition: p)
    end

    counter = :counters.new(1, [])
    me = self()

    # Load every module involved first: loading code on a first call is a long slot that
    # has nothing to do with NIFs.
    for m <- [
          Ottla.Consumer.Worker,
          Ottla.CountingHandler,
          Ottla.Group.Manager,
          Ottla.Group.Acknowledger,
          Ottla.Native
        ],
        do: Code.ensure_loaded!(m)

    group = group_name()

    member = fn id ->
      start_group!(topic, group,
        id: id,
        handler: Ottla.CountingHandler,
        handler_init_args: %{counter: counter},
        max_batch: 100
      )
    end

    conn = member.(:first)

    hammer =
      spawn_link(fn ->
        receive do
          :go -> hammer(conn, topic, me)
        end
      end)

    _reset = Ottla.Native.nif_timing()
    :erlang.system_monitor(self(), [{:long_schedule, 1}])
    send(hammer, :go)
    # A second member joins part-way: the first revokes partitions while NIFs are called.
    wait_until(fn -> :counters.get(counter, 1) >= 20_000 end, 90_000, "20,000 messages")
    member.(:second)
    # The hammer keeps calling the NIFs until the first member has revoked partitions.
    wait_for_revoke!(conn)
    wait_until(fn -> :counters.get(counter, 1) >= 100_000 end, 90_000, "100,000 messages")
    send(hammer, :stop)
    assert_receive :hammer_done, 5_000
    :erlang.system_monitor(:undefined)

    events =
      Stream.repeatedly(fn ->
        receive do
          {:monitor, pid, :long_schedule, info} -> {pid, info}
        after
          0 -> nil
        end
      end)
      |> Enum.take_while(& &1)
      |> Enum.filter(fn {pid, _} -> pid == hammer or ottla_process?(pid) end)

    # The NIFs time themselves: wall time, and the CPU time of the scheduler thread.
    {calls, max_wall, max_cpu, over_1ms} = Ottla.Native.nif_timing()
    assert calls > 1_000, "only #{calls} NIF calls were timed"

    # A NIF's own work must stay under 1 ms. Wall time also counts the OS preempting the
    # scheduler thread (2 cores, a broker and librdkafka's threads all busy), which neither
    # long_schedule nor a wall clock can tell from a blocking NIF: a NIF that blocked would be
    # slow on every call, so a rare slow call is preemption.
    assert max_cpu < 1_000, "a NIF worked #{max_cpu} µs on a normal scheduler"

    # (A rebalance runs meanwhile: a second consumer's threads and the revocation share the 2
    # cores, so up to 1 call in 100 may be preempted; a blocking NIF is slow on every call.)
    assert over_1ms * 100 <= calls,
           "#{over_1ms} of #{calls} NIF calls took 1 ms or more (longest #{max_wall} µs); " <>
             "long schedules: #{inspect(events)}"

    # long_schedule events in Ottla processes with every NIF under 1 ms of work come from
    # garbage collection or the OS; they are reported, not failed on.
    if events != [] do
      IO.puts(
        "\nlong schedules (NIF calls: #{calls}, longest #{max_wall} µs wall, #{max_cpu} µs CPU): #{inspect(events)}"
      )
    end
  end

  test "100 start/stop cycles of a connection with a producer and a consumer leave no threads behind" do
    topic = create_topic!(partitions: 2)
    :ok = Ottla.produce(endpoints(), topic, ["a", "b"], partition: 0)
    threads = fn -> length(File.ls!("/proc/self/task")) end

    cycle = fn i ->
      name = :"ottla_cycle_#{i}"

      {:ok, sup} =
        Ottla.Supervisor.start_link(
          connection: name,
          endpoints: endpoints(),
          producer: [],
          consumer: [
            topic: topic,
            begin_offset: :earliest,
            handler: Ottla.TestHandler,
            handler_init_args: %{pid: self()}
          ]
        )

      assert_receive {:batch, _, _, 0, [_ | _]}, 10_000
      :ok = Ottla.produce(name, topic, "x", partition: 1)
      Process.unlink(sup)
      ref = Process.monitor(sup)
      Process.exit(sup, :shutdown)
      assert_receive {:DOWN, ^ref, :process, ^sup, _}, 10_000
    end

    cycle.(0)
    before_threads = threads.()
    before_processes = length(Process.list())

    for i <- 1..100, do: cycle.(i)

    wait_until(fn -> threads.() <= before_threads + 2 end, 15_000, "threads to be joined")
    assert length(Process.list()) <= before_processes + 5
  end
end
