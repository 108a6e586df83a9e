defmodule Ottla.FaultHandler do
  @moduledoc false
  # The fault suite's handler (test/ottla/fault_test.exs). It runs on the test node and on
  # peer nodes, and reports to the collector on the test node with calls, so what a member
  # processed is recorded before it acks, and survives the member's node being killed:
  #
  #   {:start, member, pid, partition, generation, first, last, attempt}  before the batch
  #   {:done, member, pid, partition, generation, [{offset, value}]}      then it acks
  #   {:failed, pid, partition}                                            then it raises
  #
  # A message fails deterministically when `poison?/2` says so (about 1 % of offsets).
  use Ottla.Consumer.MessageHandler

  @call_timeout 60_000

  @doc "Whether the message at `offset` of `partition` always fails."
  def poison?(partition, offset), do: :erlang.phash2({partition, offset}, 100) == 0

  def init(args), do: {:ok, args}

  def handle_messages(messages, %{collector: collector, member: member} = state) do
    p = partition()
    g = generation_id()
    first = hd(messages).offset
    last = List.last(messages).offset

    :ok =
      GenServer.call(
        collector,
        {:start, member, self(), p, g, first, last, attempt()},
        @call_timeout
      )

    if Enum.any?(messages, &poison?(p, &1.offset)) do
      :ok = GenServer.call(collector, {:failed, self(), p}, @call_timeout)
      raise "poison message in offsets #{first}..#{last} of partition #{p}"
    else
      done = Enum.map(messages, &{&1.offset, &1.value})
      :ok = GenServer.call(collector, {:done, member, self(), p, g, done}, @call_timeout)
      {:ack, state}
    end
  end
end

defmodule Ottla.FaultCollector do
  @moduledoc false
  # Records the fault suite's events in order, in an ETS table {seq, monotonic_ms, event}:
  # the handlers' calls, the death of every handler process it saw (monitored, so a killed
  # worker or node closes its open handler call), and the faults the test injects.
  use GenServer

  def start_link(_), do: GenServer.start_link(__MODULE__, [])

  def events(collector), do: GenServer.call(collector, :events, 60_000)
  def record(collector, event), do: GenServer.call(collector, {:record, event}, 60_000)

  @doc "How many distinct messages were processed (the set of values), cheaply."
  def processed_values(collector), do: GenServer.call(collector, :processed_values, 60_000)

  @doc "A random handler process seen recently that still runs, or nil."
  def recent_pid(collector, pick), do: GenServer.call(collector, {:recent_pid, pick}, 60_000)

  @impl true
  def init([]) do
    {:ok,
     %{
       table: :ets.new(:fault_events, [:ordered_set, :public]),
       seq: 0,
       monitored: MapSet.new(),
       values: :ets.new(:fault_values, [:set, :public]),
       recent: []
     }}
  end

  @impl true
  def handle_call({:start, _member, pid, _p, _g, _first, _last, _attempt} = event, _from, s) do
    s = s |> put(event) |> monitor(pid)
    {:reply, :ok, %{s | recent: Enum.take([pid | List.delete(s.recent, pid)], 40)}}
  end

  def handle_call({:done, _member, _pid, _p, _g, done} = event, _from, s) do
    Enum.each(done, fn {_offset, value} -> :ets.insert(s.values, {value}) end)
    {:reply, :ok, put(s, event)}
  end

  def handle_call({:failed, _pid, _p} = event, _from, s), do: {:reply, :ok, put(s, event)}
  def handle_call({:record, event}, _from, s), do: {:reply, :ok, put(s, event)}

  def handle_call(:events, _from, s), do: {:reply, :ets.tab2list(s.table), s}
  def handle_call(:processed_values, _from, s), do: {:reply, :ets.info(s.values, :size), s}

  def handle_call({:recent_pid, pick}, _from, s) do
    alive = Enum.filter(s.recent, &alive?/1)
    {:reply, if(alive == [], do: nil, else: pick.(alive)), s}
  end

  @impl true
  def handle_info({:DOWN, _ref, :process, pid, reason}, s),
    do: {:noreply, put(s, {:down, pid, reason})}

  defp alive?(pid) when node(pid) == node(), do: Process.alive?(pid)

  defp alive?(pid) do
    :erpc.call(node(pid), Process, :alive?, [pid], 2_000)
  catch
    _, _ -> false
  end

  defp put(s, event) do
    seq = s.seq + 1
    :ets.insert(s.table, {seq, System.monotonic_time(:millisecond), event})
    %{s | seq: seq}
  end

  defp monitor(s, pid) do
    if MapSet.member?(s.monitored, pid) do
      s
    else
      Process.monitor(pid)
      %{s | monitored: MapSet.put(s.monitored, pid)}
    end
  end
end

defmodule Ottla.FaultPeer do
  @moduledoc false
  # Runs on a peer node: starts a member's connection under a process of its own (erpc's
  # process ends with the call), with the peer's own group leader, so the member outlives
  # the call and its logs stay on the peer.
  def start_member(opts) do
    parent = self()

    spawn(fn ->
      Process.group_leader(self(), Process.whereis(:user))
      {:ok, sup} = Ottla.Supervisor.start_link(opts)
      send(parent, {:started, sup})

      receive do
        :never -> :ok
      end
    end)

    receive do
      {:started, sup} -> {:ok, sup}
    after
      30_000 -> {:error, :timeout}
    end
  end
end

defmodule Ottla.EosTransform do
  @moduledoc false
  # The exactly-once fault run's handler (test/ottla/exactly_once_fault_test.exs): writes
  # "T:" <> value, keyed as its input, to the output topic, in the batch's transaction.
  use Ottla.Consumer.MessageHandler

  def init(args), do: {:ok, args}

  def handle_messages(messages, state),
    do: {:produce, for(m <- messages, do: {state.out, {m.key, "T:" <> m.value}}), state}
end

defmodule Ottla.FaultCluster do
  @moduledoc false
  # What the fault runs (fault_test.exs, exactly_once_fault_test.exs) share: the 3-broker
  # cluster, distribution for a peer member, the peer member itself, and putting every broker
  # back after a run.

  def endpoints, do: System.fetch_env!("OTTLA_KAFKA_CLUSTER_ENDPOINTS")

  @doc "Starts distribution (named `prefix_N@127.0.0.1`) unless it runs; stops it at exit."
  def start_distribution!(prefix) do
    unless Node.alive?() do
      {_, 0} = System.cmd("epmd", ["-daemon"])
      name = :"#{prefix}_#{System.unique_integer([:positive])}@127.0.0.1"
      {:ok, _} = :net_kernel.start([name, :longnames])
      ExUnit.Callbacks.on_exit(fn -> :net_kernel.stop() end)
    end

    :ok
  end

  @doc "{broker id, client port} of the cluster's brokers, in order (ids 1-3)."
  def ports do
    endpoints()
    |> String.split(",")
    |> Enum.map(fn hostport ->
      hostport |> String.split(":") |> List.last() |> String.to_integer()
    end)
    |> Enum.with_index(1)
    |> Enum.map(fn {port, id} -> {id, port} end)
  end

  def answers?(port) do
    case :gen_tcp.connect(~c"127.0.0.1", port, [], 1_000) do
      {:ok, socket} ->
        :gen_tcp.close(socket)
        true

      {:error, _} ->
        false
    end
  end

  @doc """
  Starts again every broker that does not answer. One that does not may still be shutting
  down (a stop the test started): stopping it again waits for that, then it starts afresh.
  """
  def restore_brokers do
    kafka = Path.expand("scripts/kafka")

    for {id, port} <- ports(), not answers?(port) do
      System.cmd(kafka, ["stop-broker", "#{id}"], stderr_to_stdout: true)
      System.cmd(kafka, ["start-broker", "#{id}"], stderr_to_stdout: true)
    end

    :ok
  end

  @doc """
  A peer node (a second BEAM, a separate OS process) running a member started with
  `Ottla.Supervisor` options `opts`: `%{peer: pid, node: node, os_pid: string}`.
  """
  def start_peer!(prefix, opts) do
    name = :"#{prefix}_#{System.unique_integer([:positive])}"
    paths = Enum.flat_map(:code.get_path(), &[~c"-pa", &1])

    {:ok, peer, node} =
      :peer.start(%{
        name: name,
        host: ~c"127.0.0.1",
        longnames: true,
        args: [~c"-setcookie", Atom.to_charlist(Node.get_cookie()) | paths]
      })

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:ottla], 30_000)
    :ok = :erpc.call(node, Logger, :configure, [[level: :emergency]])
    {:ok, _} = :erpc.call(node, Ottla.FaultPeer, :start_member, [opts])
    os_pid = :erpc.call(node, :os, :getpid, [])
    %{peer: peer, node: node, os_pid: List.to_string(os_pid)}
  end
end
