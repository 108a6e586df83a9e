defmodule Ottla.Testing do
  @moduledoc """
  An embedded Kafka for trying Ottla and for your own tests: librdkafka's in-process mock
  cluster, started through the NIF. No broker, JVM or network needed.

  The mock cluster speaks the Kafka protocol on loopback ports, so every Ottla function works
  against it. It keeps a few MiB per partition and is meant for tests, not for data.

  ## Example

      {:ok, endpoints} = Ottla.Testing.start_mock_cluster(brokers: 1)
      :ok = Ottla.create_topic(endpoints, "t", partitions: 2)
      :ok = Ottla.produce(endpoints, "t", {"k", "v"})

  In ExUnit, `start_supervised!({Ottla.Testing, brokers: 1})` returns the owning pid;
  `Ottla.Testing.endpoints(pid)` gives its endpoints.
  """
  use GenServer

  @doc false
  def child_spec(opts),
    do: %{id: {__MODULE__, make_ref()}, start: {__MODULE__, :start_link, [opts]}}

  @doc """
  Starts a mock cluster owned by a process linked to the caller and returns its endpoints.
  It stops when that process stops (`stop_mock_cluster/1`), or when the caller exits,
  for whatever reason.

  ## Options

    * `:brokers` - number of brokers, from 1 to 32. Defaults to `1`.
  """
  @spec start_mock_cluster(keyword) ::
          {:ok, [{String.t(), :inet.port_number()}]} | {:error, Ottla.Error.t()}
  def start_mock_cluster(opts \\ []) do
    with {:ok, pid} <- start_link(opts), do: {:ok, endpoints(pid)}
  end

  @doc "Stops the mock cluster behind `endpoints` (as returned by `start_mock_cluster/1`)."
  @spec stop_mock_cluster([{String.t(), :inet.port_number()}]) :: :ok
  def stop_mock_cluster(endpoints) do
    case lookup(Ottla.Options.bootstrap!(endpoints)) do
      nil -> :ok
      pid -> GenServer.stop(pid)
    end
  end

  @doc "Starts a mock cluster owned by the new process; see `start_mock_cluster/1`."
  @spec start_link(keyword) :: GenServer.on_start()
  def start_link(opts) do
    opts = Ottla.Options.keyword!(opts, [brokers: 1], "Ottla.Testing options")
    # Each mock broker holds sockets and a thread: librdkafka aborts the VM when it cannot
    # have them, so the count is bounded.
    brokers = Ottla.Options.integer!(opts[:brokers], :brokers, 1, 32)
    GenServer.start_link(__MODULE__, {brokers, self()})
  end

  @doc """
  The endpoints of the mock cluster owned by `pid`. Raises `ArgumentError` when `pid` is not
  a running mock cluster.
  """
  @spec endpoints(pid) :: [{String.t(), :inet.port_number()}]
  def endpoints(pid) when is_pid(pid) do
    GenServer.call(pid, :endpoints)
  catch
    :exit, _ -> raise ArgumentError, "#{inspect(pid)} is not a running mock cluster"
  end

  def endpoints(other),
    do: raise(ArgumentError, "invalid pid #{inspect(other)}: expected a mock cluster's pid")

  @impl true
  def init({brokers, owner}) do
    # Linked to its owner, but a link does not stop it when the owner ends normally: the
    # monitor does, so a cluster never outlives the process that started it.
    Process.monitor(owner)

    case Ottla.Native.mock_cluster_start(brokers) do
      {:ok, cluster, bootstrap} ->
        {:ok, _} = Registry.register(Ottla.Registry, {__MODULE__, bootstrap}, nil)

        endpoints =
          for e <- String.split(bootstrap, ","),
              [h, p] = String.split(e, ":"),
              do: {h, String.to_integer(p)}

        {:ok, %{cluster: cluster, bootstrap: bootstrap, endpoints: endpoints, groups: %{}}}

      {:error, error} ->
        {:stop, error}
    end
  end

  @doc false
  # The mock cluster behind a bootstrap string, if it is one of ours: the mock has no
  # CreateTopics handler, so Ottla.create_topic/3 creates topics through it.
  @spec lookup(String.t()) :: pid | nil
  def lookup(bootstrap) do
    case Registry.lookup(Ottla.Registry, {__MODULE__, bootstrap}) do
      [{pid, _}] -> pid
      [] -> nil
    end
  end

  @doc false
  # Claims `strategy` for consumer group `group` on the mock cluster behind `bootstrap` (if it
  # is one): `:ok`, or `{:error, strategy}` when the group already uses another one. The mock
  # aborts the VM when one group's members ask for different strategies, so a group keeps
  # its first one for the cluster's life.
  @spec claim_group(String.t(), String.t(), atom) :: :ok | {:error, atom}
  def claim_group(bootstrap, group, strategy) do
    case lookup(bootstrap) do
      nil -> :ok
      pid -> GenServer.call(pid, {:claim_group, group, strategy})
    end
  catch
    # The cluster stopped meanwhile: nothing to claim.
    :exit, _ -> :ok
  end

  @doc false
  # Test-only: the next `count` requests of Kafka API `api_key` (e.g. 9, OffsetFetch) to
  # broker `broker` of the mock cluster behind `endpoints` are answered after `rtt_ms`.
  def delay_requests(endpoints, broker, api_key, count, rtt_ms) do
    bootstrap = Enum.map_join(endpoints, ",", fn {h, p} -> "#{h}:#{p}" end)

    case lookup(bootstrap) do
      nil -> raise ArgumentError, "#{inspect(endpoints)} is not a running mock cluster"
      pid -> GenServer.call(pid, {:delay_requests, broker, api_key, count, rtt_ms})
    end
  end

  @impl true
  def handle_call(:endpoints, _from, state), do: {:reply, state.endpoints, state}

  def handle_call({:delay_requests, broker, api_key, count, rtt_ms}, _from, state) do
    {:reply,
     Ottla.Native.mock_cluster_delay_requests(state.cluster, broker, api_key, count, rtt_ms),
     state}
  end

  def handle_call({:claim_group, group, strategy}, _from, state) do
    groups = state.groups

    case Map.get(groups, group, strategy) do
      ^strategy -> {:reply, :ok, Map.put(state, :groups, Map.put(groups, group, strategy))}
      other -> {:reply, {:error, other}, state}
    end
  end

  def handle_call({:create_topic, topic, partitions, replicas}, _from, state) do
    {:reply, Ottla.Native.mock_cluster_create_topic(state.cluster, topic, partitions, replicas),
     state}
  end

  @impl true
  def handle_info({:DOWN, _ref, :process, _owner, _reason}, state), do: {:stop, :normal, state}
  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, state) do
    # Clients cached for calls given this cluster's endpoints would only retry a dead port.
    Ottla.Native.clients_forget(state.bootstrap)
    Ottla.Native.mock_cluster_stop(state.cluster)
  end
end
