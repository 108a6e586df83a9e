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
      :stop -> send(parent, :hammer_done)
    after
      0 ->
        _ = Ottla.Group.Acknowledger.get_latest_offset(conn, topic, 0)
        :erlang.yield()
        {:ok, _} = Ottla.stats(conn)
        :erlang.yield()
        :ok = Ottla.Group.Acknowledger.update_generation_id(conn, 1)
        # A pause between rounds: the point is many NIF calls during consumption, not a
        # process that is always runnable (which the OS could preempt mid-slot).
        Process.sleep(1)
        hammer(conn, topic, parent)
    end
  end

  test "no NIF call holds a normal scheduler for 1 ms while 40,000 messages are consumed" do
    topic = create_topic!(partitions: 4)
    value = String.duplicate("x", 100)

    for p <- 0..3 do
      :ok =
        Ottla.produce(endpoints(), topic, for(i <- 1..10_000, do: {"k#{i}", value}), partition: p)
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

    conn =
      start_group!(topic, group_name(),
        handler: Ottla.CountingHandler,
        handler_init_args: %{counter: counter},
        max_batch: 200
      )

    hammer =
      spawn_link(fn ->
        receive do
          :go -> hammer(conn, topic, me)
        end
      end)

    _reset = Ottla.Native.nif_max_micros()
    :erlang.system_monitor(self(), [{:long_schedule, 1}])
    send(hammer, :go)
    wait_until(fn -> :counters.get(counter, 1) >= 40_000 end, 90_000, "40,000 messages")
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

    # The NIFs time themselves: the longest call on a normal scheduler during the run.
    longest = Ottla.Native.nif_max_micros()

    # long_schedule cannot tell a NIF from a garbage collection or the OS preempting a
    # scheduler thread (2 cores, a broker and librdkafka's threads all busy). A long slot
    # caused by a NIF shows in `longest`; any other is reported, not failed on.
    assert longest < 1_000,
           "a NIF held a normal scheduler for #{longest} µs; long schedules seen: #{inspect(events)}"

    if events != [] do
      IO.puts(
        "\nlong schedules not caused by NIFs (longest NIF call #{longest} µs): #{inspect(events)}"
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
