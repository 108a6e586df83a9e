defmodule Ottla.Connection do
  @moduledoc false
  # Owns a named connection's native clients. Its settings live in :persistent_term, so
  # `Ottla.produce(:conn, ...)` reaches the producer without a process hop.
  use GenServer
  require Logger

  defstruct [:name, :bootstrap, :config, :producer, :clients, :pid, transactional?: false]

  @type t :: %__MODULE__{
          name: atom,
          bootstrap: String.t(),
          config: [{String.t(), String.t()}],
          producer: reference | nil,
          clients: reference,
          pid: pid,
          transactional?: boolean
        }

  @producer_defaults [
    # Retries can neither reorder nor duplicate messages.
    {"enable.idempotence", "true"},
    {"request.required.acks", "all"},
    # The Java client's partitioner: the same key lands on the same partition.
    {"partitioner", "murmur2_random"},
    {"linger.ms", "0"},
    {"message.timeout.ms", "30000"}
  ]

  @doc "librdkafka properties Ottla sets on every producer before the user's."
  def producer_defaults, do: @producer_defaults

  def start_link(opts), do: GenServer.start_link(__MODULE__, opts)

  @doc "The settings of a running connection, or `nil`."
  @spec lookup(atom) :: t | nil
  def lookup(name), do: :persistent_term.get({__MODULE__, name}, nil)

  @doc "Resolves endpoints or a connection name to `{bootstrap, config, connection | nil}`."
  @spec resolve!(atom | Ottla.Options.endpoints()) :: {String.t(), list, t | nil}
  def resolve!(name) when is_atom(name) and name not in [nil, true, false] do
    case lookup(name) do
      %__MODULE__{} = conn ->
        {conn.bootstrap, conn.config, conn}

      nil ->
        raise ArgumentError,
              "no Ottla connection named #{inspect(name)} is running " <>
                "(start one with Ottla.Supervisor.start_link/1, or pass endpoints)"
    end
  end

  def resolve!(endpoints), do: {Ottla.Options.bootstrap!(endpoints), [], nil}

  @doc """
  The clients that admin, fetch and metadata calls on `target` reuse: a connection's own, or
  the ones shared by calls given the same endpoints, closed once no call has used them for
  the application env `:endpoint_clients_idle` (ms, 30 s by default).
  """
  @spec clients!(atom | Ottla.Options.endpoints()) :: reference
  def clients!(target) do
    case resolve!(target) do
      {_, _, %__MODULE__{clients: clients}} ->
        clients

      {bootstrap, config, nil} ->
        idle = Application.get_env(:ottla, :endpoint_clients_idle, 30_000)
        Ottla.Native.clients_cached(bootstrap, config, idle)
    end
  end

  @doc "How many clients of each kind a connection's calls created (a test hook)."
  @spec clients_created(atom | Ottla.Options.endpoints()) :: %{atom => non_neg_integer}
  def clients_created(target), do: Ottla.Native.clients_created(clients!(target))

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    name = Keyword.fetch!(opts, :connection)
    bootstrap = Keyword.fetch!(opts, :bootstrap)
    config = Keyword.fetch!(opts, :config)

    with {:ok, producer} <- start_producer(bootstrap, config, opts[:producer]) do
      conn = %__MODULE__{
        name: name,
        bootstrap: bootstrap,
        config: config,
        producer: producer,
        clients: Ottla.Native.clients_new(bootstrap, config),
        pid: self(),
        transactional?: transactional?(config, opts[:producer])
      }

      :persistent_term.put({__MODULE__, name}, conn)
      {:ok, conn}
    else
      {:error, %Ottla.Error{} = error} -> {:stop, error}
    end
  end

  @doc "Gives a running connection a producer, unless it has one."
  @spec start_producer(t, [{String.t(), String.t()}]) :: :ok | {:error, Ottla.Error.t()}
  def start_producer(%__MODULE__{pid: pid}, producer_config) do
    GenServer.call(pid, {:start_producer, producer_config}, 30_000)
  catch
    :exit, _ -> {:error, Ottla.Error.new(:no_connection, "the connection stopped")}
  end

  @impl true
  def handle_call({:start_producer, _config}, _from, %__MODULE__{producer: producer} = conn)
      when producer != nil,
      do: {:reply, :ok, conn}

  def handle_call({:start_producer, producer_config}, _from, conn) do
    case start_producer(conn.bootstrap, conn.config, producer_config) do
      {:ok, producer} ->
        conn = %{
          conn
          | producer: producer,
            transactional?: transactional?(conn.config, producer_config)
        }

        :persistent_term.put({__MODULE__, conn.name}, conn)
        {:reply, :ok, conn}

      {:error, error} ->
        {:reply, {:error, error}, conn}
    end
  end

  # The producer is transactional when its configuration (the last value wins) has an id.
  defp transactional?(_config, nil), do: false

  defp transactional?(config, producer_config) do
    case List.keyfind(Enum.reverse(config ++ producer_config), "transactional.id", 0) do
      {_, id} when id != "" -> true
      _ -> false
    end
  end

  # A transactional producer's fatal error other than fencing: the connection stops and its
  # supervisor starts it again, with a new producer. (A fenced producer stays as it is: a
  # newer one with its id has taken over.)
  @impl true
  def handle_info({:ottla_producer_failed, %Ottla.Error{} = error}, conn) do
    Logger.error(
      "Ottla connection #{inspect(conn.name)}: the transactional producer failed " <>
        "(#{error.code}): #{error.message}; restarting the connection"
    )

    {:stop, {:producer_failed, error}, conn}
  end

  def handle_info(_message, conn), do: {:noreply, conn}

  defp start_producer(_bootstrap, _config, nil), do: {:ok, nil}

  defp start_producer(bootstrap, config, producer_config) do
    user = config ++ producer_config

    # librdkafka refuses a message.timeout.ms above transaction.timeout.ms, and fits its own
    # to a transaction timeout the user set: Ottla's default then gives way.
    defaults =
      if transactional?(config, producer_config) and
           List.keymember?(user, "transaction.timeout.ms", 0),
         do: List.keydelete(@producer_defaults, "message.timeout.ms", 0),
         else: @producer_defaults

    Ottla.Native.producer_new(bootstrap, defaults ++ user)
  end

  @impl true
  def terminate(_reason, %__MODULE__{} = conn) do
    :persistent_term.erase({__MODULE__, conn.name})
    if conn.clients, do: Ottla.Native.clients_close(conn.clients)

    if conn.producer do
      # Deliver what is queued before the connection goes away.
      Ottla.Reply.await(&Ottla.Native.producer_flush(&1, &2, conn.producer, 10_000), 10_000)
      Ottla.Native.producer_close(conn.producer, 1_000)
    end

    :ok
  end
end
