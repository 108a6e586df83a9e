defmodule Ottla.TestHandler do
  @moduledoc false
  # A handler for tests: `handler_init_args: %{pid: test_pid, fun: fn messages, state -> result end}`.
  # Every batch is first reported to `pid` as {:batch, self(), topic, partition, messages}.
  # Without `:fun` it acks every batch.
  use Ottla.Consumer.MessageHandler

  def init(args), do: {:ok, args}

  def handle_messages(messages, state) do
    send(state.pid, {:batch, self(), topic(), partition(), messages})

    case state do
      %{fun: fun} -> fun.(messages, state)
      _ -> {:ack, state}
    end
  end
end

defmodule Ottla.StatelessHandler do
  @moduledoc false
  # Elsa's stateless form: handle_messages/1 only. Acks everything; reports to the pid in
  # the :ottla_test_pid application env.
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages) do
    send(
      Application.get_env(:ottla, :test_pid),
      {:stateless, partition(), generation_id(), messages}
    )

    :ack
  end
end

defmodule Ottla.CountingHandler do
  @moduledoc false
  # Counts messages in a :counters reference and acks; sends nothing.
  use Ottla.Consumer.MessageHandler

  def handle_messages(messages, %{counter: counter} = state) do
    :counters.add(counter, 1, length(messages))
    {:ack, state}
  end
end

defmodule Ottla.TestPartitioner do
  @moduledoc false
  # A partitioner module of an app's own: by the key's last digit.
  @behaviour Ottla.Partitioner

  @impl true
  def partition(count, key), do: rem(:binary.last(key), count)
end

defmodule :telemetry do
  @moduledoc false
  # A stand-in for the :telemetry library (Ottla has no dependencies): forwards every event to
  # the processes in the :ottla_telemetry_listeners persistent term. With this module loaded,
  # Ottla.Telemetry emits, as it would in an app that has :telemetry.
  def execute(event, measurements, metadata) do
    for pid <- :persistent_term.get(:ottla_telemetry_listeners, []) do
      send(pid, {:telemetry, event, measurements, metadata})
    end

    :ok
  end
end
