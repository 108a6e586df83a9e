defmodule Ottla.Supervisor do
  @moduledoc """
  Starts a named Ottla connection: the native clients for one Kafka cluster, and (in later
  releases) its consumers. The shape of its options follows Elsa's `Elsa.Supervisor`.

  ## Example

      children = [
        {Ottla.Supervisor,
         connection: :orders,
         endpoints: [localhost: 9092],
         config: ["client.id": "orders-service"],
         producer: [topic: "orders"]}
      ]

      Supervisor.start_link(children, strategy: :one_for_one)

      :ok = Ottla.produce(:orders, "orders", [{"key", "value"}])

  ## Options

    * `:connection` - the connection's name, an atom; pass it where the API takes endpoints.
      Required.
    * `:endpoints` - the bootstrap brokers: `[{host, port}]`, `[localhost: 9092]` or
      `"host:port,host:port"`. Required.
    * `:config` - librdkafka properties for every client of the connection, e.g.
      `["security.protocol": "ssl"]`. Keys are atoms or strings, values strings, numbers,
      booleans or atoms. Defaults to `[]`.
    * `:producer` - start a producer so `Ottla.produce/4` can be called with the connection
      name. Elsa's form `[topic: "t", config: [...]]` (or a list of them) is accepted; the
      `:config` entries of all of them go to the connection's one librdkafka producer.
      Ottla sets `acks=all`, the Java client's key partitioner (`murmur2_random`),
      `linger.ms=5` and `message.timeout.ms=30000` unless overridden. Without it,
      `Ottla.produce/4` on the connection returns `{:error, %Ottla.Error{code: :no_producer}, _}`.
  """
  use Supervisor

  @doc "Returns a child spec for a connection; see the module doc for options."
  @spec child_spec(keyword) :: Supervisor.child_spec()
  def child_spec(opts) do
    %{
      id: {__MODULE__, Keyword.get(opts, :connection)},
      start: {__MODULE__, :start_link, [opts]},
      type: :supervisor
    }
  end

  @doc "Starts the connection's supervisor; see the module doc for options."
  @spec start_link(keyword) :: Supervisor.on_start()
  def start_link(opts) do
    opts =
      Ottla.Options.keyword!(
        opts,
        [:connection, :endpoints, :producer, config: []],
        "Ottla.Supervisor options"
      )

    name = opts[:connection]

    unless is_atom(name) and name not in [nil, true, false] do
      raise ArgumentError, "invalid :connection #{inspect(name)}: expected an atom"
    end

    unless Keyword.has_key?(opts, :endpoints), do: raise(ArgumentError, "missing :endpoints")

    conn_opts = [
      connection: name,
      bootstrap: Ottla.Options.bootstrap!(opts[:endpoints]),
      config: Ottla.Options.config!(opts[:config]),
      producer: producer_config!(opts[:producer])
    ]

    Supervisor.start_link(__MODULE__, conn_opts, name: via(name))
  end

  @doc false
  def via(name), do: {:via, Registry, {Ottla.Registry, {__MODULE__, name}}}

  @impl true
  def init(conn_opts) do
    children = [%{id: Ottla.Connection, start: {Ottla.Connection, :start_link, [conn_opts]}}]
    Supervisor.init(children, strategy: :one_for_all)
  end

  defp producer_config!(nil), do: nil

  defp producer_config!(producer) when is_list(producer) do
    entries = if Keyword.keyword?(producer), do: [producer], else: producer

    Enum.flat_map(entries, fn entry ->
      entry = Ottla.Options.keyword!(entry, [:topic, config: []], ":producer")
      if entry[:topic], do: Ottla.Options.topic!(entry[:topic])
      Ottla.Options.config!(entry[:config], :producer)
    end)
  end

  defp producer_config!(other),
    do: raise(ArgumentError, "invalid :producer #{inspect(other)}: expected a keyword list")
end
