defmodule Ottla.BadInputTest do
  # Not async: it runs many calls against the shared broker, in a VM of its own.
  use ExUnit.Case, async: false

  import Bitwise

  alias Ottla.BadInput

  @moduletag timeout: 900_000

  # Calls run concurrently in the peer: most fail validation at once, the others wait on a
  # broker (up to their short timeouts).
  @lanes 8

  # Replayed on every run unless OTTLA_FUZZ_SEED says otherwise (see the test).
  @default_seed 14

  describe "generated bad input" do
    @tag :fuzz
    test "every public function returns a documented value or raises ArgumentError" do
      # A fixed seed by default, so that a run (CI's too) is repeatable; OTTLA_FUZZ_SEED=random
      # explores a new one (printed for replay).
      seed =
        case System.get_env("OTTLA_FUZZ_SEED") do
          "random" -> :rand.uniform(1_000_000_000)
          nil -> @default_seed
          value -> String.to_integer(value)
        end

      count = env_int("OTTLA_FUZZ_CALLS") || 10_000

      indexes =
        case System.get_env("OTTLA_FUZZ_INDEX") do
          nil -> Enum.to_list(0..(count - 1))
          list -> list |> String.split(",", trim: true) |> Enum.map(&String.to_integer/1)
        end

      started = System.monotonic_time(:millisecond)
      {peer, ctx} = start_peer(seed)
      result = run_calls(peer, ctx, seed, indexes)
      stop_peer(peer)
      secs = (System.monotonic_time(:millisecond) - started) / 1000

      kinds =
        result.kinds
        |> Enum.sort_by(fn {_, n} -> -n end)
        |> Enum.map_join(", ", fn {kind, n} -> "#{inspect(kind)} #{n}" end)

      IO.puts(
        "\nbad input: #{result.done} calls in #{Float.round(secs, 1)} s, seed #{seed} " <>
          "(replay: OTTLA_FUZZ_SEED=#{seed}); outcomes: #{kinds}; defects: #{length(result.defects)}"
      )

      if System.get_env("OTTLA_FUZZ_VERBOSE") do
        functions =
          result.functions
          |> Enum.sort()
          |> Enum.map_join(", ", fn {function, n} -> "#{function} #{n}" end)

        IO.puts("bad input: calls by function: #{functions}")
      end

      crash =
        case result.died do
          nil ->
            []

          in_flight ->
            case isolate_crash(seed, in_flight) do
              nil ->
                # Work an earlier call left running (a consumer, a mock cluster) can crash
                # the VM too: then no call crashes it alone, and all of them are shown.
                for index <- in_flight,
                    do:
                      {index,
                       "the VM crashed (the peer died) while this call ran; no call of those " <>
                         "running crashes it alone: look at the VM's last words above", nil}

              culprit ->
                [{culprit, "the VM crashed (the peer died): this call alone crashes it", nil}]
            end
        end

      defects = crash ++ Enum.sort_by(result.defects, fn {i, _, _} -> i || -1 end)

      if defects != [] do
        shown =
          defects
          |> Enum.take(25)
          |> Enum.map_join("\n", fn {index, why, code} ->
            code = code || render_index(seed, index, ctx)

            "  call #{inspect(index)}: #{why}\n    #{code}\n    replay: OTTLA_FUZZ_SEED=#{seed} " <>
              "OTTLA_FUZZ_INDEX=#{inspect(index)} mix test #{__ENV__.file}"
          end)

        flunk("#{length(defects)} call(s) did something undocumented (seed #{seed}):\n#{shown}")
      end
    end
  end

  # Each defect the generator (or the probe before it) found, as a small test of its own.
  describe "regressions" do
    import Ottla.TestSupport

    test "improper lists in endpoints, headers, config and messages raise ArgumentError" do
      ep = endpoints()

      assert_raise ArgumentError, ~r/endpoints/, fn ->
        Ottla.list_topics([{"127.0.0.1", 9092} | :tail])
      end

      assert_raise ArgumentError, ~r/headers/, fn ->
        Ottla.produce(ep, "t", %{value: "v", headers: [{"h", "v"} | :tail]})
      end

      assert_raise ArgumentError, ~r/config/, fn ->
        Ottla.produce(ep, "t", "v", config: [{"client.id", "x"} | :tail])
      end

      assert_raise ArgumentError, ~r/config/, fn ->
        Ottla.create_topic(ep, "t", config: [{"retention.ms", 1} | :tail])
      end

      assert_raise ArgumentError, ~r/messages/, fn -> Ottla.produce(ep, "t", ["a" | "b"]) end

      assert_raise ArgumentError, ~r/ssl/, fn ->
        Ottla.list_topics(ep) &&
          Ottla.produce(ep, "t", "v", config: [ssl: [{:verify, :verify_peer} | :x]])
      end
    end

    test "hosts that are not text raise ArgumentError naming the endpoints" do
      for host <- [[-1], [0xD800], [:a], [?a | ?b], <<255>>, "a\0b"] do
        assert_raise ArgumentError, ~r/endpoints/, fn -> Ottla.list_topics([{host, 9092}]) end
      end

      assert_raise ArgumentError, ~r/endpoints/, fn -> Ottla.list_topics(<<255, ?:, ?1>>) end
    end

    test "non-UTF-8 or NUL topics, groups, header names and config values name the argument" do
      ep = endpoints()
      assert_raise ArgumentError, ~r/topic/, fn -> Ottla.fetch(ep, <<255, 254>>) end
      assert_raise ArgumentError, ~r/topic/, fn -> Ottla.fetch(ep, "a\0b") end
      assert_raise ArgumentError, ~r/group/, fn -> Ottla.committed_offsets(ep, <<255>>, "t") end

      assert_raise ArgumentError, ~r/client.id/, fn ->
        Ottla.produce(ep, "t", "v", config: ["client.id": <<255>>])
      end

      assert_raise ArgumentError, ~r/header name/, fn ->
        Ottla.produce(ep, "t", %{value: "v", headers: [{<<255>>, "v"}]})
      end
    end

    test "a secret of the wrong shape is refused without being shown" do
      error =
        assert_raise ArgumentError, fn ->
          Ottla.produce(endpoints(), "t", "v", config: [ssl: [password: %{secret: "hunter2"}]])
        end

      refute error.message =~ "hunter2"
    end

    test "a timestamp beyond 64 bits and a generation id beyond 32 bits raise ArgumentError" do
      assert_raise ArgumentError, ~r/timestamp/, fn ->
        Ottla.produce(endpoints(), "t", %{value: "v", timestamp: 1 <<< 63})
      end

      assert_raise ArgumentError, ~r/generation_id/, fn ->
        Ottla.Group.Acknowledger.ack(:no_such_connection, "t", 0, 1 <<< 31, 1)
      end
    end

    test "absurd mock sizes are refused before librdkafka sees them" do
      {:ok, mock} = Ottla.Testing.start_mock_cluster()

      assert_raise ArgumentError, ~r/partitions/, fn ->
        Ottla.create_topic(mock, "t", partitions: 2_147_483_647)
      end

      assert_raise ArgumentError, ~r/replicas/, fn ->
        Ottla.create_topic(mock, "t", replicas: 32_768)
      end

      assert_raise ArgumentError, ~r/brokers/, fn ->
        Ottla.Testing.start_mock_cluster(brokers: 100_000)
      end

      assert_raise ArgumentError, ~r/brokers/, fn ->
        Ottla.Testing.start_mock_cluster(brokers: 33)
      end
    end

    test "a topic with a NUL byte is refused by the consumer NIF itself, not with a panic" do
      tuning = %{
        max_batch: 1,
        max_backlog: 1,
        max_buffered_bytes: 1 <<< 20,
        drain_timeout: 0,
        commit_interval: 1000,
        commit: false,
        max_attempts: nil,
        retry_backoff: 1,
        max_retry_backoff: 1,
        on_failure: :retry,
        start_from_worker: false,
        exactly_once: false
      }

      assert {:error, %Ottla.Error{code: :invalid_topic}} =
               Ottla.Native.consumer_new(
                 endpoints(),
                 [{"group.id", "g"}],
                 self(),
                 self(),
                 ["a\0b"],
                 [],
                 tuning
               )

      assert_raise ArgumentError, ~r/topic/, fn ->
        Ottla.Supervisor.start_link(
          connection: :nul_topic,
          endpoints: endpoints(),
          group_consumer: [group: "g", topics: ["a\0b"], handler: Ottla.BadInput.Handler]
        )
      end
    end

    test "Testing.endpoints/1 and Fetch searches raise ArgumentError for a wrong argument" do
      assert_raise ArgumentError, ~r/pid/, fn -> Ottla.Testing.endpoints(:x) end

      assert_raise ArgumentError, ~r/mock cluster/, fn ->
        Ottla.Testing.endpoints(:c.pid(0, 32_767, 1))
      end

      assert_raise ArgumentError, ~r/fun/, fn -> Ottla.Fetch.search(endpoints(), "t", :x) end

      assert_raise ArgumentError, ~r/term/, fn ->
        Ottla.Fetch.search_keys(endpoints(), "t", nil)
      end
    end

    test "a partitioner module that raises gives ArgumentError naming :partitioner" do
      topic = create_topic!(partitions: 2)

      assert_raise ArgumentError, ~r/partitioner/, fn ->
        Ottla.produce(endpoints(), topic, {"k", "v"},
          partitioner: Ottla.BadInput.RaisingPartitioner
        )
      end
    end

    test "a supervisor :name OTP cannot register under raises ArgumentError before starting" do
      for name <- [{:via, :no_such_module, 1}, "name", 1, true] do
        assert_raise ArgumentError, ~r/:name/, fn ->
          Ottla.Supervisor.start_link(connection: :bad_name, endpoints: endpoints(), name: name)
        end
      end
    end

    test "a connection name already running, under a supervisor :name, is already_started" do
      Process.flag(:trap_exit, true)
      name = conn_name()
      {:ok, first} = Ottla.Supervisor.start_link(connection: name, endpoints: endpoints())

      assert {:error, {:already_started, ^first}} =
               Ottla.Supervisor.start_link(
                 connection: name,
                 endpoints: endpoints(),
                 name: :"#{name}_supervisor"
               )
    end

    test "config entries that are not pairs raise ArgumentError naming the config" do
      assert_raise ArgumentError, ~r/config/, fn ->
        Ottla.produce(endpoints(), "t", "v", config: [1, 2])
      end
    end

    test "a consumer's :begin_offset beyond 64 bits raises ArgumentError, not a NIF badarg" do
      assert_raise ArgumentError, ~r/begin_offset/, fn ->
        Ottla.Supervisor.start_link(
          connection: :huge_offset,
          endpoints: endpoints(),
          consumer: [topic: "t", handler: Ottla.BadInput.Handler, begin_offset: 1 <<< 70]
        )
      end
    end

    test "a consumer for a partition the topic does not have is refused at start" do
      Process.flag(:trap_exit, true)
      topic = create_topic!(partitions: 3)

      assert {:error, reason} =
               Ottla.Supervisor.start_link(
                 connection: :partition_99,
                 endpoints: endpoints(),
                 consumer: [topic: topic, partition: 99, handler: Ottla.BadInput.Handler]
               )

      assert inspect(reason) =~ "unknown_partition"
    end

    test "a group consumer the broker refuses (session.timeout.ms: 1) stops with the error" do
      Process.flag(:trap_exit, true)
      topic = create_topic!()

      {:ok, sup} =
        Ottla.Supervisor.start_link(
          connection: :session_1,
          endpoints: endpoints(),
          group_consumer: [
            group: group_name(),
            topics: [topic],
            handler: Ottla.BadInput.Handler,
            config: ["session.timeout.ms": 1]
          ]
        )

      [manager] =
        for {{Ottla.Group.Manager, :group}, pid, _, _} <- Supervisor.which_children(sup), do: pid

      ref = Process.monitor(manager)
      assert_receive {:DOWN, ^ref, :process, ^manager, reason}, 30_000
      assert {:consumer_failed, %Ottla.Error{code: :invalid_session_timeout}} = reason
      # It keeps failing: its supervisor gives up, and the connection stops.
      assert_receive {:EXIT, ^sup, _}, 60_000
    end

    test "a mock cluster stops when its owner exits normally" do
      parent = self()

      {owner, ref} =
        spawn_monitor(fn ->
          {:ok, endpoints} = Ottla.Testing.start_mock_cluster()
          send(parent, {:endpoints, endpoints})
        end)

      assert_receive {:endpoints, endpoints}
      assert_receive {:DOWN, ^ref, :process, ^owner, :normal}
      bootstrap = Ottla.Options.bootstrap!(endpoints)
      wait_until(fn -> Ottla.Testing.lookup(bootstrap) == nil end, 5_000, "the mock to stop")
      assert {:error, %Ottla.Error{}} = Ottla.list_topics(endpoints, timeout: 500)
    end

    test "on a mock cluster, a group keeps its first assignment strategy (in a VM of its own)" do
      # Before the guard, the second member's join aborted the VM in librdkafka's mock.
      paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
      {:ok, peer, _} = :peer.start_link(%{connection: :standard_io, args: paths})

      try do
        {:ok, _} = :peer.call(peer, Application, :ensure_all_started, [:ottla])
        :ok = :peer.call(peer, Logger, :configure, [[level: :none]])

        assert {:started, {:raised, ArgumentError, message}, :started} =
                 :peer.call(peer, Ottla.BadInput.Runner, :mock_mixed_strategies, [], 60_000)

        assert message =~ ~r/assignment_strategy.*range/
        # Still alive after the members had time to join.
        assert :peer.call(peer, :erlang, :node, []) == :nonode@nohost
      after
        stop_peer(peer)
      end
    end

    test "the mock cluster NIFs refuse absurd sizes themselves (in a VM of its own)" do
      paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
      {:ok, peer, _} = :peer.start_link(%{connection: :standard_io, args: paths})

      try do
        {:ok, _} = :peer.call(peer, Application, :ensure_all_started, [:ottla])

        assert {:error, %Ottla.Error{code: :invalid_arg}} =
                 :peer.call(peer, Ottla.Native, :mock_cluster_start, [100_000])

        assert {:error, %Ottla.Error{code: :invalid_arg}} =
                 :peer.call(peer, Ottla.BadInput.Runner, :mock_topic, [2_147_483_647, 1])

        assert {:error, %Ottla.Error{code: :invalid_arg}} =
                 :peer.call(peer, Ottla.BadInput.Runner, :mock_topic, [1, 32_768])
      after
        stop_peer(peer)
      end
    end

    test "killing Ottla's registry does not stop the application (in a VM of its own)" do
      paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
      {:ok, peer, _} = :peer.start_link(%{connection: :standard_io, args: paths})

      try do
        {:ok, _} = :peer.call(peer, Application, :ensure_all_started, [:ottla])
        :ok = :peer.call(peer, Logger, :configure, [[level: :none]])
        old = :peer.call(peer, Process, :whereis, [Ottla.Registry])
        true = :peer.call(peer, Process, :exit, [old, :kill])
        :ok = :peer.call(peer, Process, :sleep, [500])
        running = :peer.call(peer, Application, :started_applications, [])
        assert Enum.any?(running, &match?({:ottla, _, _}, &1))
        new = :peer.call(peer, Process, :whereis, [Ottla.Registry])
        assert is_pid(new) and new != old
      after
        stop_peer(peer)
      end
    end
  end

  defp env_int(name) do
    case System.get_env(name) do
      nil -> nil
      value -> String.to_integer(value)
    end
  end

  defp start_peer(seed) do
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])
    {:ok, peer, _node} = :peer.start_link(%{connection: :standard_io, args: paths})
    # The peer is linked; its death must be an outcome, not the end of the test process.
    Process.unlink(peer)

    ctx =
      :peer.call(
        peer,
        Ottla.BadInput.Runner,
        :setup,
        [Ottla.TestSupport.endpoints(), seed],
        60_000
      )

    {peer, ctx}
  end

  defp stop_peer(peer) do
    :peer.stop(peer)
  catch
    _, _ -> :ok
  end

  defp run_calls(peer, ctx, seed, indexes) do
    queue = :ets.new(:fuzz_queue, [:public])
    in_flight = :ets.new(:fuzz_in_flight, [:public])
    :ets.insert(queue, {:next, 0})
    todo = List.to_tuple(indexes)

    lanes =
      for lane <- 1..@lanes do
        Task.async(fn -> lane(lane, peer, ctx, seed, todo, queue, in_flight, []) end)
      end

    results = Task.await_many(lanes, :infinity)
    died? = Enum.any?(results, &match?({:peer_died, _}, &1))
    records = Enum.flat_map(results, fn {_, records} -> records end)

    kinds = Enum.frequencies_by(records, fn {_, kind, _, _} -> kind end)
    functions = Enum.frequencies_by(records, fn {_, _, _, function} -> function end)
    defects = for {index, _, {:defect, why, code}, _} <- records, do: {index, why, code}

    died =
      if died?,
        do: in_flight |> :ets.tab2list() |> Enum.map(&elem(&1, 1)) |> Enum.sort()

    %{done: length(records), kinds: kinds, functions: functions, defects: defects, died: died}
  end

  defp lane(lane, peer, ctx, seed, todo, queue, in_flight, acc) do
    at = :ets.update_counter(queue, :next, 1) - 1

    if at >= tuple_size(todo) do
      {:ok, acc}
    else
      index = elem(todo, at)
      call = BadInput.call(seed, index, ctx)
      :ets.insert(in_flight, {lane, index})

      if System.get_env("OTTLA_FUZZ_VERBOSE"),
        do: IO.puts(:stderr, "call #{index}: #{BadInput.render(call)}")

      try do
        :peer.call(
          peer,
          Ottla.BadInput.Runner,
          :run,
          [call.mfa, call.budget],
          call.budget + 30_000
        )
      catch
        :exit, _ -> {:peer_died, acc}
      else
        {outcome, _ms} ->
          :ets.delete(in_flight, lane)

          verdict =
            case BadInput.classify(call.expect, outcome) do
              :ok -> :ok
              {:defect, why} -> {:defect, why, BadInput.render(call)}
            end

          lane(lane, peer, ctx, seed, todo, queue, in_flight, [
            {index, BadInput.kind(outcome), verdict, BadInput.function(call)} | acc
          ])
      end
    end
  end

  # The peer died with several calls in flight: run each alone in a new peer; the first one
  # that kills it is the reproducer (nil if none does).
  defp isolate_crash(seed, candidates) do
    Enum.find(candidates, fn index ->
      {peer, ctx} = start_peer(seed)
      call = BadInput.call(seed, index, ctx)

      try do
        :peer.call(
          peer,
          Ottla.BadInput.Runner,
          :run,
          [call.mfa, call.budget],
          call.budget + 30_000
        )

        stop_peer(peer)
        false
      catch
        :exit, _ -> true
      end
    end)
  end

  defp render_index(_seed, nil, _ctx), do: "(unknown call)"
  defp render_index(seed, index, ctx), do: BadInput.render(BadInput.call(seed, index, ctx))
end
