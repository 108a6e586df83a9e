defmodule Ottla.BadInput.Runner do
  @moduledoc false
  # The peer VM's half of the bad-input test: sets up what the generated calls refer to, and
  # runs each call in a process of its own, with a deadline, so that a crash or a hang is an
  # outcome instead of the end of the run. A crash of the VM itself ends the peer; the test
  # then names the calls that were running.

  @doc "Starts Ottla and what the calls use; returns the context for `Ottla.BadInput.call/3`."
  def setup(endpoints, seed) do
    {:ok, _} = Application.ensure_all_started(:ottla)
    # librdkafka's complaints about the calls' bad brokers are expected: keep them quiet.
    Logger.configure(level: :none)

    parent = self()

    # The context's long-lived processes belong to `owner`, not to the :peer.call process.

    owner =
      spawn(fn ->
        loop = fn loop ->
          receive do
            {:run, fun, from, ref} ->
              send(from, {ref, fun.()})
              loop.(loop)
          end
        end

        loop.(loop)
      end)

    send_to_owner = fn fun ->
      ref = make_ref()
      send(owner, {:run, fun, parent, ref})
      receive do: ({^ref, result} -> result)
    end

    topic = "fuzz-#{seed}-#{System.os_time(:millisecond)}-#{:rand.uniform(1_000_000)}"
    :ok = Ottla.create_topic(endpoints, topic, partitions: 3)
    :ok = Ottla.produce(endpoints, topic, for(i <- 1..30, do: {"k#{i}", "v#{i}"}))

    {mock, mock_topic} =
      send_to_owner.(fn ->
        {:ok, mock} = Ottla.Testing.start_mock_cluster()
        :ok = Ottla.create_topic(mock, "fuzz-mock", partitions: 2)
        :ok = Ottla.produce(mock, "fuzz-mock", ["a", "b", "c"])
        {mock, "fuzz-mock"}
      end)

    send_to_owner.(fn ->
      Process.flag(:trap_exit, true)

      {:ok, _} =
        Ottla.Supervisor.start_link(
          connection: :fuzz_conn,
          endpoints: endpoints,
          producer: [topic: topic]
        )

      {:ok, _} = Ottla.Supervisor.start_link(connection: :fuzz_noprod, endpoints: endpoints)

      {:ok, _} =
        Ottla.Supervisor.start_link(
          connection: :fuzz_txn,
          endpoints: endpoints,
          producer: [transactional_id: "fuzz-txn-#{seed}-#{System.os_time(:millisecond)}"]
        )

      {:ok, _} =
        Ottla.Supervisor.start_link(
          connection: :fuzz_consumer,
          endpoints: endpoints,
          consumer: [topic: topic, handler: Ottla.BadInput.Handler, begin_offset: :earliest]
        )

      {:ok, _} =
        Ottla.Supervisor.start_link(
          connection: :fuzz_group,
          endpoints: endpoints,
          group_consumer: [
            group: "fuzz-group-#{seed}-#{System.os_time(:millisecond)}",
            topics: [topic],
            handler: Ottla.BadInput.Handler,
            begin_offset: :earliest,
            config: ["session.timeout.ms": 10_000, "heartbeat.interval.ms": 1_000]
          ]
        )

      {:ok, stopped} =
        Ottla.Supervisor.start_link(connection: :fuzz_stopped, endpoints: endpoints)

      Supervisor.stop(stopped)
    end)

    %{endpoints: endpoints, mock: mock, topic: topic, mock_topic: mock_topic, seed: seed}
  end

  @doc """
  Runs `{m, f, args}` in a new process (trapping exits, so links made by the call cannot
  kill it) and returns `{outcome, ms}`: `{:returned, value}`, `{:raised, module, message}`,
  `{:caught, kind, reason}`, `{:died, reason}` or `{:hang, budget}`. Processes the call
  started (`{:ok, pid}`) are stopped within a bounded cleanup (`{:cleanup_hang, ms}` if not).
  """
  def run({m, f, args}, budget) do
    parent = self()
    ref = make_ref()
    started = System.monotonic_time(:millisecond)

    {pid, mref} =
      spawn_monitor(fn ->
        Process.flag(:trap_exit, true)

        outcome =
          try do
            {:returned, apply(m, f, args)}
          rescue
            e -> {:raised, e.__struct__, Exception.message(e) |> String.slice(0, 500)}
          catch
            kind, reason -> {:caught, kind, inspect(reason, limit: 10, printable_limit: 300)}
          end

        send(parent, {ref, summarize(outcome)})
        cleanup(outcome)
      end)

    outcome =
      receive do
        {^ref, outcome} ->
          outcome

        {:DOWN, ^mref, :process, ^pid, reason} ->
          {:died, inspect(reason, limit: 10, printable_limit: 300)}
      after
        budget ->
          Process.exit(pid, :kill)
          {:hang, budget}
      end

    ms = System.monotonic_time(:millisecond) - started

    # The cleanup must end too (bounded): a stop that hangs is a defect of its own.
    outcome =
      receive do
        {:DOWN, ^mref, :process, ^pid, _} -> outcome
      after
        20_000 ->
          Process.exit(pid, :kill)
          if match?({:returned, _}, outcome), do: {:cleanup_hang, 20_000}, else: outcome
      end

    {outcome, ms}
  end

  # What goes back to the test: no pids, references or big binaries of this VM.
  defp summarize({:returned, {:ok, pid}}) when is_pid(pid),
    do: {:returned, {:ok, :c.pid(0, 0, 0)}}

  defp summarize({:returned, value}), do: {:returned, shrink(value)}
  defp summarize(other), do: other

  defp shrink(bin) when is_binary(bin) and byte_size(bin) > 1000, do: binary_part(bin, 0, 100)
  defp shrink(list) when is_list(list), do: shrink_list(list)

  defp shrink(tuple) when is_tuple(tuple),
    do: tuple |> Tuple.to_list() |> Enum.map(&shrink/1) |> List.to_tuple()

  defp shrink(%_{} = struct), do: struct
  defp shrink(map) when is_map(map), do: Map.new(map, fn {k, v} -> {shrink(k), shrink(v)} end)
  defp shrink(other), do: other

  defp shrink_list([]), do: []
  defp shrink_list([head | tail]), do: [shrink(head) | shrink_list(tail)]
  defp shrink_list(other), do: shrink(other)

  defp cleanup({:returned, {:ok, pid}}) when is_pid(pid), do: stop(pid)

  defp cleanup({:returned, {:ok, [{host, port} | _] = endpoints}})
       when is_binary(host) and is_integer(port),
       do: Ottla.Testing.stop_mock_cluster(endpoints)

  defp cleanup(_), do: :ok

  defp stop(pid) do
    ref = Process.monitor(pid)
    Process.exit(pid, :shutdown)

    receive do
      {:DOWN, ^ref, :process, ^pid, _} -> :ok
    end
  end

  @doc "Asks the mock cluster NIF itself (no Elixir bounds) for a topic of this size."
  def mock_topic(partitions, replicas) do
    {:ok, cluster, _bootstrap} = Ottla.Native.mock_cluster_start(1)
    Ottla.Native.mock_cluster_create_topic(cluster, "t", partitions, replicas)
  end

  @doc """
  Two group members with different assignment strategies on one mock cluster group, and a
  third with the first one's, given time to join: `{first, second, third}` outcomes.
  """
  def mock_mixed_strategies do
    {:ok, mock} = Ottla.Testing.start_mock_cluster()
    :ok = Ottla.create_topic(mock, "t", partitions: 2)

    start = fn connection, strategy ->
      Ottla.Supervisor.start_link(
        connection: connection,
        endpoints: mock,
        group_consumer: [
          group: "g",
          topics: ["t"],
          handler: Ottla.BadInput.Handler,
          assignment_strategy: strategy
        ]
      )
    end

    outcome = fn fun ->
      try do
        case fun.() do
          {:ok, pid} when is_pid(pid) -> :started
          other -> other
        end
      rescue
        e -> {:raised, e.__struct__, Exception.message(e)}
      end
    end

    Process.flag(:trap_exit, true)
    first = outcome.(fn -> start.(:mock_g1, :range) end)
    second = outcome.(fn -> start.(:mock_g2, :cooperative_sticky) end)
    third = outcome.(fn -> start.(:mock_g3, :range) end)
    # The group's rebalance with both range members (where the mock would abort on mixed
    # strategies) has happened once each holds one of the two partitions.
    for {conn, :started} <- [mock_g1: first, mock_g3: third] do
      Ottla.Testing.await_assignment(conn, partitions: 1, timeout: 20_000)
    end

    {first, second, third}
  end

  @doc "Takes a few elements of an `Ottla.Fetch` stream (built by `fun` with `args`)."
  def take_stream(fun, args), do: Ottla.Fetch |> apply(fun, args) |> Enum.take(5)
end
